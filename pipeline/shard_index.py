"""The shard index of an unfinished output: OUTPUT/_index/*.parquet, the id, status and error of
published shards with each row's shard name, so that a resume (and the end of a run) reads a few
index files instead of every shard.

Every index file is written whole (storage.write_bytes) after the shards it names were published,
so a shard it names is complete and its rows are those it lists (a shard is never rewritten under
its name). The index only saves reads: a shard that no index names (its run died before it wrote
its index) is read itself, and an index row whose shard is gone (removed as a repeat or a stray)
is ignored. A run writes its index in files of up to FLUSH_ROWS rows and at its end or
interrupt; the finished run removes the index before it writes _SUCCESS (the filters rewrite
shards after that point, and a finished output needs no index).

This module knows pyarrow and the storage layer, not Ray.
"""

from __future__ import annotations

import io
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import layout, storage
from pipeline.spec import StorageSpec

# The columns a row of the index has: its shard's name (relative to the output) and what the
# end-of-run stats count.
COLUMNS = ["shard", "id", "status", "error"]
# Rows a run gathers before it writes an index file (about 40 MB; a crash costs at most these
# rows' shards being read again at resume).
FLUSH_ROWS = 1 << 20


def schema() -> pa.Schema:
    # The shard name repeats for every row of a shard: a dictionary keeps one copy per shard.
    return pa.schema([("shard", pa.dictionary(pa.int32(), pa.string()))] +
                     [(c, pa.string()) for c in COLUMNS[1:]])


def empty() -> pa.Table:
    return schema().empty_table()


def rows_of(shard: str, table: pa.Table) -> pa.Table:
    """The index rows of the shard ``shard`` that holds ``table`` (an output table)."""
    names = pa.DictionaryArray.from_arrays(pa.array([0] * table.num_rows, pa.int32()), pa.array([shard]))
    return pa.table([names] + [table.column(c).cast(pa.string()) for c in COLUMNS[1:]], schema=schema())


def conform(table: pa.Table) -> pa.Table:
    """``table`` (COLUMNS, the shard as text or a dictionary) in the index's schema."""
    shard = table.column("shard")
    if not pa.types.is_dictionary(shard.type):
        shard = pc.dictionary_encode(shard)
    return pa.table([shard.cast(schema().field("shard").type)] + [table.column(c) for c in COLUMNS[1:]],
                    schema=schema())


def write(output: str, storage_spec: StorageSpec | None, table: pa.Table) -> str | None:
    """Publish ``table`` (index rows) as one new index file; its name, or None for no rows."""
    if not table.num_rows:
        return None
    name = f"{layout.INDEX}/{uuid.uuid4().hex}{layout.SHARD_SUFFIX}"
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(storage.join(output, name), buffer.getvalue(), storage_spec)
    return name


def read(output: str, storage_spec: StorageSpec | None, shards: set[str]) -> pa.Table:
    """The index rows of the shards ``shards``, each shard's from one index file."""
    fs, path = storage.filesystem(output, storage_spec)
    folder = f"{path}/{layout.INDEX}"
    with storage.guard("read index", storage.join(output, layout.INDEX), storage_spec):
        if not shards or not fs.exists(folder):
            return empty()
        files = sorted(f for f in fs.find(folder) if f.endswith(layout.SHARD_SUFFIX))
        wanted = pa.array(sorted(shards))
        seen: set[str] = set()
        parts = []
        for file in files:
            with fs.open(file, "rb") as f:
                table = conform(pq.read_table(f, read_dictionary=["shard"]))
            names = set(pc.unique(table.column("shard")).to_pylist())
            if not names <= shards:  # rows of removed shards
                table = table.filter(pc.is_in(table.column("shard"), value_set=wanted))
                names &= shards
            if names & seen:  # a shard two files name (a dead run's index written after a scan read it)
                table = table.filter(pc.invert(pc.is_in(table.column("shard"), value_set=pa.array(sorted(seen)))))
            seen |= names
            parts.append(table)
    return pa.concat_tables(parts) if parts else empty()


def remove(output: str, storage_spec: StorageSpec | None) -> None:
    fs, path = storage.filesystem(output, storage_spec)
    with storage.guard("remove index", storage.join(output, layout.INDEX), storage_spec):
        if fs.exists(f"{path}/{layout.INDEX}"):
            fs.rm(f"{path}/{layout.INDEX}", recursive=True)
