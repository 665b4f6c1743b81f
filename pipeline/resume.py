"""Resume: the shards published under OUTPUT/data/ are the record of which ids are done.

A shard is published whole (``storage.write_bytes``: a temporary name then a rename, or one PUT),
so every listed shard is complete and its ids need no work. A rerun after a crash lists them,
skips their ids, and at the end keeps exactly those shards plus its own. Two cases make that
more than a listing:

- a write that finished after its run died (a worker outliving its driver) can publish a shard
  whose ids a later run has written again: a shard that repeats ids of an earlier one is removed
  when listed, and at the end any shard that neither the listing nor this run accounts for is too;
- local temporary files of interrupted writes (``*.tmp-PID``) are removed.

Ray Data's own checkpointing (``ray.data.checkpoint``) was the first choice but does not fit: for
a datasink that is not one of Ray's file datasinks it records ids only after the write, so a crash
between the two duplicates rows (at-least-once), and its filter runs in an extra actor pool that
reserves a whole CPU and 1 GiB, which small nodes whose CPUs the stage pools hold cannot give.

This module knows pyarrow and the storage layer, not Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline import id_checks, layout, manifest, shard_index, storage
from pipeline.errors import ShardgenError, SpecError
from pipeline.spec import JobSpec

# What the final stats are computed from.
STATS_COLUMNS = ["id", "status", "error"]
# The spec fields that decide what a row becomes.
ROW_FIELDS = ("manifest", "columns", "stages", "flows", "format", "limits", "filters")
# Row fields whose keys are the user's (column names, flow names), not spec fields.
MAPPING_FIELDS = ("columns", "flows")
# Fields that do not shape the rows (the stages' actor pools, how often shards are published):
# a rerun may change them.
FREE_FIELDS = ("actors", "cpus_per_actor", "gpus_per_actor", "publish_every_minutes")


@dataclass
class Written:
    """Shards in the output and their rows' id/status/error, each row with its shard's name (one
    table in the index's schema, pipeline/shard_index.py): nothing is held per shard but a name."""

    files: list[str] = field(default_factory=list)  # relative to the output: data/part-….parquet, sorted
    table: pa.Table = field(default_factory=shard_index.empty)
    removed: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.table.num_rows

    def done(self) -> pa.Array:
        """Every id the shards hold (each once: scan removed repeats)."""
        return self.table.column("id").combine_chunks() if self.rows else pa.array([], pa.string())

    def without(self, names: set[str]) -> "Written":
        gone = pc.is_in(self.table.column("shard"), value_set=pa.array(sorted(names), pa.string()))
        return Written([n for n in self.files if n not in names], self.table.filter(pc.invert(gone)), self.removed)


def _shard_files(spec: JobSpec) -> tuple[object, str, list[str]]:
    """The output's filesystem, its path, and every file under data/ (relative names, sorted).
    Listed through pyarrow: locally its C++ listing is 10x faster than fsspec's per file."""
    fs, path = storage.filesystem(spec.output, spec.storage)
    listing, _ = storage.arrow_filesystem(spec.output, spec.storage)
    found = listing.get_file_info(pafs.FileSelector(f"{path}/{layout.DATA}", recursive=True, allow_not_found=True))
    names = sorted(f.path[len(path) + 1:] for f in found if f.type == pafs.FileType.File)
    return fs, path, names


def read_stats_columns(spec: JobSpec, fs, path: str, names: list[str]) -> pa.Table:
    """The index rows (shard, id, status, error) of the shards ``names``, read from the shards
    themselves by DuckDB in one query over all of them (its threads read many files at once,
    object storage through the registered fsspec filesystem)."""
    if not names:
        return shard_index.empty()
    remote = storage.is_remote(spec.output)
    prefix = f"{spec.output.rstrip('/')}/" if remote else f"{path}/"
    with id_checks.connection() as con:
        if remote:
            con.register_filesystem(fs)
        # DuckDB's filename is the location as given: the prefix off it is the shard's name.
        table = con.sql(f"SELECT substr(filename, {len(prefix) + 1}) AS shard, {', '.join(STATS_COLUMNS)} "
                        "FROM read_parquet($files, filename = true)",
                        params={"files": [prefix + n for n in names]}).to_arrow_table()
    return shard_index.conform(table)


def read_written(spec: JobSpec, fs, path: str, names: list[str], log=print) -> pa.Table:
    """The index rows of the shards ``names``: from the index where it names them, the others read
    from the shards (and then indexed, so that the next resume need not read them again)."""
    indexed = shard_index.read(spec.output, spec.storage, set(names))
    known = set(pc.unique(indexed.column("shard")).to_pylist()) if indexed.num_rows else set()
    unindexed = [n for n in names if n not in known]
    if not unindexed:
        return indexed
    if len(unindexed) > 1:
        log(f"shardgen: reading {len(unindexed)} shard(s) that no index names")
    read = read_stats_columns(spec, fs, path, unindexed)
    shard_index.write(spec.output, spec.storage, read)
    return pa.concat_tables([indexed, read])


def _repeating(written: Written) -> set[str]:
    """The shards (in name order) that repeat an id of a shard before them that is kept."""
    ids = written.table.column("id")
    if not written.rows or pc.count_distinct(ids).as_py() == len(ids):
        return set()  # the usual case: no id twice, nothing more to hold
    counts = pc.value_counts(ids)
    twice = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    mine: dict[str, set[str]] = {}
    for row in written.table.filter(pc.is_in(ids, value_set=twice)).select(["shard", "id"]).to_pylist():
        mine.setdefault(row["shard"], set()).add(row["id"])
    kept: set[str] = set()
    repeating = set()
    for name in sorted(mine):
        if kept & mine[name]:
            repeating.add(name)
        else:
            kept |= mine[name]
    return repeating


def scan(spec: JobSpec, log=print) -> Written:
    """List the published shards and read their rows' id/status/error (the index, and the shards
    it does not name); remove temporary leftovers and shards that repeat earlier ids."""
    fs, path, names = _shard_files(spec)
    for name in names:
        if not name.endswith(layout.SHARD_SUFFIX):
            fs.rm(f"{path}/{name}")
    shards = [n for n in names if n.endswith(layout.SHARD_SUFFIX)]
    written = Written(shards, read_written(spec, fs, path, shards, log))
    repeating = _repeating(written)
    if repeating:
        for name in sorted(repeating):
            fs.rm(f"{path}/{name}")
        written = written.without(repeating)
        written.removed = sorted(repeating)
    if written.removed:
        log(f"shardgen: removed {len(written.removed)} shard(s) that repeat ids of earlier shards "
            f"(written after their run died): {', '.join(written.removed)}")
    return written


def _differences(before, now, where: str) -> list[str]:
    """The paths (``stages.0.model``) where two JSON values differ, each with both values."""
    if isinstance(before, dict) and isinstance(now, dict):
        # A field missing from before is one that version of shardgen did not have: it ran as its default.
        keys = [k for k in before if k not in FREE_FIELDS]
        if where in MAPPING_FIELDS:  # but a column mapping or flow added on the rerun is a change
            keys += [k for k in now if k not in before]
        return [d for k in keys for d in _differences(before.get(k), now.get(k), f"{where}.{k}")]
    if isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
        return [d for i, (b, n) in enumerate(zip(before, now)) for d in _differences(b, n, f"{where}.{i}")]
    return [] if before == now else [f"{where} ({json.dumps(before)} -> {json.dumps(now)})"]


def check_same_job(spec: JobSpec) -> None:
    """A rerun on an output, finished or not, must be the same job: the spec fields that shape its
    rows must be those that the first run wrote to _job.json (storage options, resources and
    max_error_fraction may change)."""
    uri = storage.join(spec.output, layout.JOB)
    if not storage.exists(uri, spec.storage):
        return
    before = json.loads(storage.read_bytes(uri, spec.storage))["spec"]
    now = spec.public_dict()
    changed = [d for k in ROW_FIELDS if k in before for d in _differences(before[k], now.get(k), k)]
    if changed:
        raise SpecError(f"output {spec.output} holds a run of another spec (changed: {'; '.join(changed)}); "
                        "rerun with the same spec, or pass --overwrite to delete the output and start again")


def check_ids(written: Written, spec: JobSpec) -> None:
    """Shards of ids that the manifest lacks come from another manifest: refuse to mix them. The
    manifest's ids stream through an anti-join (pipeline/id_checks.py), never all held at once."""
    with storage.guard("read manifest", spec.manifest, spec.storage):
        foreign, examples = id_checks.missing_from(written.done(), manifest.id_batches(spec))
    if foreign:
        shown = ", ".join(repr(i) for i in examples[:5])
        raise SpecError(f"output {spec.output} holds {foreign} id(s) that the manifest lacks ({shown}); "
                        "it was written from another manifest: pass --overwrite to start again")


def settle(spec: JobSpec, written: Written, new_files: list[str], manifest_rows: int,
           log=print) -> tuple[list[str], pa.Table]:
    """Keep the listed shards and this run's, remove any other (a late write of a dead run), and
    return the kept shards and their rows' shard/id/status/error, checked to hold every id once;
    then remove the shard index."""
    fs, path, names = _shard_files(spec)
    keep = set(written.files) | set(new_files)
    strays = [n for n in names if n not in keep]
    for name in strays:
        fs.rm(f"{path}/{name}")
    if strays:
        log(f"shardgen: removed {len(strays)} file(s) that no run accounts for: {', '.join(strays)}")
    missing = keep.difference(names)
    if missing:
        raise ShardgenError(f"shard(s) written by this run are gone from the output: {', '.join(sorted(missing))}")
    # The listed shards' rows were read by scan; this run's come from the index its publisher wrote.
    new = read_written(spec, fs, path, sorted(keep.difference(written.files)), log)
    table = pa.concat_tables([written.table, new])
    distinct = pc.count_distinct(table.column("id")).as_py() if table.num_rows else 0
    if distinct != table.num_rows or table.num_rows != manifest_rows:
        raise ShardgenError(f"the output holds {table.num_rows} rows with {distinct} distinct ids for "
                            f"{manifest_rows} manifest rows; rerun to complete it")
    # The output is whole: what follows (filters, _SUCCESS) needs no index, and the filters rewrite shards.
    shard_index.remove(spec.output, spec.storage)
    return sorted(keep), table
