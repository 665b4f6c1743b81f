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
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import id_checks, layout, manifest, storage
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
    """Shards in the output and their id/status/error columns: one table, shard after shard, so
    that nothing is held per shard but its name and row count."""

    files: list[str] = field(default_factory=list)  # relative to the output: data/part-….parquet
    counts: list[int] = field(default_factory=list)  # each file's rows, in the table's order
    table: pa.Table = field(default_factory=lambda: _empty_stats())
    removed: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.table.num_rows

    def done(self) -> pa.Array:
        """Every id the shards hold (each once: scan removed repeats)."""
        return self.table.column("id").combine_chunks() if self.rows else pa.array([], pa.string())

    def shards(self) -> Iterator[tuple[str, pa.Table]]:
        start = 0
        for name, rows in zip(self.files, self.counts):
            yield name, self.table.slice(start, rows)
            start += rows

    def without(self, names: set[str]) -> "Written":
        kept = [(n, t) for n, t in self.shards() if n not in names]
        return Written([n for n, _ in kept], [t.num_rows for _, t in kept],
                       pa.concat_tables([t for _, t in kept]) if kept else _empty_stats(), self.removed)


def _shard_files(spec: JobSpec) -> tuple[object, str, list[str]]:
    """The output's filesystem, its path, and every file under data/ (relative names, sorted)."""
    fs, path = storage.filesystem(spec.output, spec.storage)
    if not fs.exists(f"{path}/{layout.DATA}"):
        return fs, path, []
    names = sorted(f[len(path) + 1:] for f in fs.find(f"{path}/{layout.DATA}"))
    return fs, path, names


def read_stats_columns(spec: JobSpec, fs, path: str, names: list[str]) -> Written:
    """The id/status/error columns of the shards ``names`` (sorted), read by DuckDB in one query
    over all of them (its threads read many files at once, object storage through the registered
    fsspec filesystem), so the time per shard does not grow with the count."""
    if not names:
        return Written()
    remote = storage.is_remote(spec.output)
    locations = [storage.join(spec.output, n) if remote else f"{path}/{n}" for n in names]
    with id_checks.connection() as con:
        if remote:
            con.register_filesystem(fs)
        table = con.sql(f"SELECT filename, {', '.join(STATS_COLUMNS)} FROM read_parquet($files, filename = true) "
                        "ORDER BY filename", params={"files": locations}).to_arrow_table()
    # In the order of first appearance, which is the sorted order (a shard of no rows is absent).
    counts = {c["values"]: c["counts"] for c in pc.value_counts(table.column("filename")).to_pylist()}
    return Written(list(names), [counts.get(loc, 0) for loc in locations], table.select(STATS_COLUMNS))


def _empty_stats() -> pa.Table:
    return pa.table({c: pa.array([], pa.string()) for c in STATS_COLUMNS})


def _repeating(written: Written) -> set[str]:
    """The shards (in name order) that repeat an id of a shard before them that is kept."""
    ids = written.table.column("id")
    if not written.rows or pc.count_distinct(ids).as_py() == len(ids):
        return set()  # the usual case: no id twice, nothing more to hold
    counts = pc.value_counts(ids)
    twice = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    kept: set[str] = set()
    repeating = set()
    for name, table in written.shards():
        mine = set(table.column("id").filter(pc.is_in(table.column("id"), value_set=twice)).to_pylist())
        if kept & mine:
            repeating.add(name)
        else:
            kept |= mine
    return repeating


def scan(spec: JobSpec, log=print) -> Written:
    """List the published shards; remove temporary leftovers and shards that repeat earlier ids."""
    fs, path, names = _shard_files(spec)
    for name in names:
        if not name.endswith(layout.SHARD_SUFFIX):
            fs.rm(f"{path}/{name}")
    written = read_stats_columns(spec, fs, path, [n for n in names if n.endswith(layout.SHARD_SUFFIX)])
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


def drop_done(table: pa.Table, done: pa.Array) -> pa.Table:
    """The rows of ``table`` whose id is not in ``done``."""
    return table.filter(pc.invert(pc.is_in(table.column("id"), value_set=done)))


def settle(spec: JobSpec, written: Written, new_files: list[str], manifest_rows: int,
           log=print) -> tuple[list[str], pa.Table]:
    """Keep the listed shards and this run's, remove any other (a late write of a dead run), and
    return the kept shards and their id/status/error columns, checked to hold every id once."""
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
    # The listed shards' columns were read by scan; only this run's shards are read here.
    new = read_stats_columns(spec, fs, path, sorted(keep.difference(written.files)))
    table = pa.concat_tables([written.table, new.table])
    distinct = pc.count_distinct(table.column("id")).as_py() if table.num_rows else 0
    if distinct != table.num_rows or table.num_rows != manifest_rows:
        raise ShardgenError(f"the output holds {table.num_rows} rows with {distinct} distinct ids for "
                            f"{manifest_rows} manifest rows; rerun to complete it")
    return sorted(keep), table
