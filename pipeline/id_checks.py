"""Checks over every id of a manifest or an output, out of core: the ids stream from pyarrow (which
reads any storage) into DuckDB, whose hash tables spill to a temporary folder beyond
ID_CHECK_MEMORY. The driver's memory for a check is that bound plus one batch of ids, whatever
the row count (measured: docs/performance.md).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import duckdb
import pyarrow as pa

# DuckDB's memory for a check: past it, its hash tables go to disk (slower, never out of memory).
ID_CHECK_MEMORY = "256MB"
# Ids per batch read from the manifest, and the bytes read from its file at a time.
BATCH_ROWS = 1 << 16
READ_BUFFER = 1 << 20


@contextmanager
def connection() -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection with bounded memory that spills to a temporary folder of its own,
    removed afterwards (a check writes nothing that stays)."""
    spill = tempfile.mkdtemp(prefix="shardgen-ids-")
    con = duckdb.connect()
    try:
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        con.execute(f"SET memory_limit = '{ID_CHECK_MEMORY}'")
        con.execute(f"SET temp_directory = '{spill}'")
        con.execute("SET preserve_insertion_order = false")
        yield con
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


@dataclass
class IdCounts:
    rows: int
    nulls: int
    duplicated: int  # ids that occur more than once
    examples: list[str]  # the first few duplicated ids, in order


# Duplicated ids shown in a message.
EXAMPLES = 10


def count_ids(batches: pa.RecordBatchReader) -> IdCounts:
    """Rows, null ids and duplicated ids of a stream of batches with an ``id`` column."""
    rows = 0

    def counted() -> Iterator[pa.RecordBatch]:
        nonlocal rows
        for batch in batches:
            rows += batch.num_rows
            yield batch

    with connection() as con:
        con.register("ids", pa.RecordBatchReader.from_batches(batches.schema, counted()))
        # Only the ids seen more than once (and the nulls) are kept: a small table, so the
        # examples need no second read; the grouping itself spills.
        con.execute("CREATE TEMP TABLE repeated AS SELECT id, count(*) AS n FROM ids GROUP BY id "
                    "HAVING count(*) > 1 OR id IS NULL")
        nulls, duplicated = con.execute(
            "SELECT coalesce(sum(n) FILTER (WHERE id IS NULL), 0), count(*) FILTER (WHERE id IS NOT NULL) "
            "FROM repeated").fetchone()
        examples = [r[0] for r in con.execute(
            f"SELECT id FROM repeated WHERE id IS NOT NULL ORDER BY id LIMIT {EXAMPLES}").fetchall()] \
            if duplicated else []
    return IdCounts(rows, int(nulls), int(duplicated), examples)


def missing_from(ids: pa.Array, batches: pa.RecordBatchReader) -> tuple[int, list[str]]:
    """How many of ``ids`` the stream ``batches`` (an ``id`` column) lacks, and the first few."""
    with connection() as con:
        con.register("wanted", pa.table({"id": ids}))
        con.register("have", batches)
        con.execute("CREATE TEMP TABLE missing AS SELECT id FROM wanted ANTI JOIN have USING (id)")
        count = con.execute("SELECT count(*) FROM missing").fetchone()[0]
        examples = [r[0] for r in con.execute(f"SELECT id FROM missing ORDER BY id LIMIT {EXAMPLES}").fetchall()]
    return int(count), examples
