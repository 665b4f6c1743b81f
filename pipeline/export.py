"""`shardgen export webdataset OUTPUT DEST`: a finished Parquet output as WebDataset tar shards,
DEST/{split}-000000.tar, … (split: the output's split folders; `train` for an output without).

Rows with `status: ok` are exported (filtered rows too with ``include_filtered``; error rows have
no image). Each tar is published whole (storage.write_bytes), its rows a fixed slice of the
output's rows in shard order, so a rerun skips the tars that exist and writes only the rest; the
card (README.md: the features, for `datasets.load_dataset(DEST)`) and then the export's record
(_webdataset.json) are written last, and a rerun against another output run or
other options is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import layout, storage
from pipeline.card import webdataset_card
from pipeline.errors import SpecError
from pipeline.spec import StorageSpec
from pipeline.writers.webdataset import WebDatasetWriter, sample_schema

RECORD = "_webdataset.json"
CARD = "README.md"  # the features `datasets.load_dataset(DEST)` reads
DEFAULT_SPLIT = "train"


def tar_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _rows(fs, root: str, names: list[str], statuses: list[str]) -> Iterator[pa.Table]:
    for name in names:
        # One file, read on this thread: pq.read_table's dataset scan starts Arrow's thread pools,
        # whose workers, still alive when the process exits, can abort it ("terminate called
        # without an active exception", exit 134) after the export has succeeded.
        with fs.open(f"{root}/{name}", "rb") as f:
            table = pq.ParquetFile(f, pre_buffer=False).read(use_threads=False)
        # A row a safety checker filtered has no image to export.
        yield table.filter(pc.and_(pc.is_in(table.column("status"), value_set=pa.array(statuses)),
                                   pc.is_valid(table.column("image_sha256"))))


def export_webdataset(output: str, dest: str, rows_per_shard: int = 1000, include_filtered: bool = False,
                      storage_spec: StorageSpec | None = None, log=print) -> dict[str, dict[str, int]]:
    """Export; return {split: {"shards": n, "samples": m}}."""
    storage_spec = storage_spec or StorageSpec()
    if rows_per_shard < 1:
        raise SpecError(f"--rows-per-shard must be at least 1, got {rows_per_shard}")
    success = storage.join(output, layout.SUCCESS)
    if not storage.exists(success, storage_spec):
        raise SpecError(f"{output} is not a finished shardgen output (no {layout.SUCCESS}); finish the run first")
    options = {"source_run": json.loads(storage.read_bytes(success, storage_spec))["run_id"],
               "rows_per_shard": rows_per_shard, "include_filtered": include_filtered}
    record_uri = storage.join(dest, RECORD)
    if storage.exists(record_uri, storage_spec):
        before = json.loads(storage.read_bytes(record_uri, storage_spec))
        if before["options"] != options:
            raise SpecError(f"{dest} holds an export of other options or another run ({before['options']}); "
                            "choose another destination")
    else:  # first, so that an interrupted export is resumed only with the same options
        record = json.dumps({"options": options, "splits": None}) + "\n"
        storage.write_bytes(record_uri, record.encode(), storage_spec)
    fs, root = storage.filesystem(output, storage_spec)
    dest_fs, dest_root = storage.filesystem(dest, storage_spec)
    names = sorted(n[len(root) + 1:] for n in fs.find(f"{root}/{layout.DATA}") if n.endswith(layout.SHARD_SUFFIX))
    by_split: dict[str, list[str]] = {}
    for name in names:
        by_split.setdefault(layout.split_of(name) or DEFAULT_SPLIT, []).append(name)
    statuses = ["ok", "filtered"] if include_filtered else ["ok"]
    writer, summary, sample = WebDatasetWriter(), {}, None
    for split, files in sorted(by_split.items()):
        index, samples, pending = 0, 0, []
        for table in _rows(fs, root, files, statuses):
            if sample is None and table.num_rows:
                sample = sample_schema(table)
            pending.append(table)
            while sum(t.num_rows for t in pending) >= rows_per_shard:
                whole = pa.concat_tables(pending, promote_options="permissive")
                _publish(writer, dest, dest_fs, dest_root, tar_name(split, index), whole.slice(0, rows_per_shard),
                         storage_spec, log)
                pending, index, samples = [whole.slice(rows_per_shard)], index + 1, samples + rows_per_shard
        rest = sum(t.num_rows for t in pending)
        if rest:
            _publish(writer, dest, dest_fs, dest_root, tar_name(split, index),
                     pa.concat_tables(pending, promote_options="permissive"), storage_spec, log)
            index, samples = index + 1, samples + rest
        summary[split] = {"shards": index, "samples": samples}
    if sample is not None:
        card = webdataset_card(sample, {s: f"{s}-*.tar" for s, counts in summary.items() if counts["samples"]})
        storage.write_bytes(storage.join(dest, CARD), card.encode(), storage_spec)
    storage.write_bytes(record_uri, (json.dumps({"options": options, "splits": summary}, indent=2) + "\n").encode(),
                        storage_spec)
    return summary


def _publish(writer: WebDatasetWriter, dest: str, fs, root: str, name: str, table: pa.Table,
             storage_spec: StorageSpec, log) -> None:
    if fs.exists(f"{root}/{name}"):  # published whole by an earlier run of the export
        return
    writer.publish(storage.join(dest, name), table, storage_spec)
    log(f"shardgen: {name}: {table.num_rows} samples")
