"""The job's shard writer: the pipeline's tables, in whatever sizes they come, become shards of
exactly ``rows_per_shard`` rows under OUTPUT/data/ (the last of a run, per split, and partial
shards published by time hold fewer), each under a name no other shard of any run uses, each
published whole.

One ShardWriter per run gathers the rows (pipeline/shard_publisher.py holds it in an actor):
write tasks convert and count their rows (output_rows) and hand them over; the writer publishes a
shard as soon as it is full, and a partial one when its oldest row has waited
``publish_every_s``, so that an interrupt costs minutes of work, not a shard. It holds encoded
rows only, at most one shard's worth per split. It also indexes what it published
(pipeline/shard_index.py): a resume and the end of the run read that index, not the shards.

This module knows pyarrow and the storage layer, not Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import columns, layout, shard_index, storage
from pipeline.output_schema import to_output_table
from pipeline.spec import StorageSpec
from pipeline.writers.parquet import ParquetWriter


@dataclass
class ShardReport:
    """What was written; the reports of all write tasks add up to the run's stats."""

    rows: int = 0
    ok: int = 0
    files: list[str] = field(default_factory=list)
    stage_busy_s: dict[str, float] = field(default_factory=dict)


def combine(reports: list[ShardReport]) -> ShardReport:
    total = ShardReport()
    for r in reports:
        total.rows += r.rows
        total.ok += r.ok
        total.files += r.files
        for k, v in r.stage_busy_s.items():
            total.stage_busy_s[k] = total.stage_busy_s.get(k, 0.0) + v
    return total


def output_rows(table: pa.Table) -> tuple[pa.Table, ShardReport]:
    """The pipeline's ``table`` as output rows, and their counts (no files yet): what a write
    task does before it hands its rows to the run's ShardWriter."""
    report = ShardReport(rows=table.num_rows)
    for name in table.column_names:
        if name.startswith(columns.ELAPSED_PREFIX):
            report.stage_busy_s[name[len(columns.ELAPSED_PREFIX):]] = float(pc.sum(table.column(name)).as_py() or 0)
    out = to_output_table(table)
    report.ok = int(pc.sum(pc.equal(out.column("status"), "ok")).as_py() or 0)
    return out, report


@dataclass
class _Pending:
    """The rows of one split waiting for their shard."""

    tables: list[pa.Table] = field(default_factory=list)
    rows: int = 0
    since: float = 0.0  # when the oldest of them arrived


class ShardWriter:
    """Gathers a run's output rows into shards of ``rows_per_shard`` rows under OUTPUT/data/."""

    def __init__(self, output: str, storage_spec: StorageSpec, run_id: str, rows_per_shard: int,
                 publish_every_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.output = output
        self.storage = storage_spec
        self.run_id = run_id
        self.rows_per_shard = rows_per_shard
        self.publish_every_s = publish_every_s
        self.clock = clock
        self.format = ParquetWriter()
        self.pending: dict[str | None, _Pending] = {}
        self.keys: set = set()
        self.report = ShardReport()
        self.shards = 0
        self.index: list[pa.Table] = []  # index rows of published shards not yet in an index file
        self.index_rows = 0

    def add(self, table: pa.Table, report: ShardReport, key=None) -> None:
        """Take the output rows ``table`` (counted in ``report``, see output_rows) and publish
        every shard they fill. A ``key`` seen before is a retried write task's: its rows are here
        already and are ignored."""
        if key is not None:
            if key in self.keys:
                return
            self.keys.add(key)
        self.report = combine([self.report, report])
        for split, part in _by_split(table):
            pending = self.pending.setdefault(split, _Pending())
            if not pending.rows:
                pending.since = self.clock()
            pending.tables.append(part)
            pending.rows += part.num_rows
            while pending.rows >= self.rows_per_shard:
                self._publish(split, self.rows_per_shard)
        self.publish_due()

    def publish_due(self) -> None:
        """Publish, as a partial shard, the rows of each split whose oldest has waited
        ``publish_every_s`` or longer."""
        if self.publish_every_s is None:
            return
        now = self.clock()
        for split, pending in list(self.pending.items()):
            if pending.rows and now - pending.since >= self.publish_every_s:
                self._publish(split, pending.rows)

    def flush(self) -> ShardReport:
        """Publish every waiting row; return what this writer wrote."""
        for split, pending in list(self.pending.items()):
            if pending.rows:
                self._publish(split, pending.rows)
        self._write_index()
        return self.report

    def _write_index(self) -> None:
        if self.index:
            shard_index.write(self.output, self.storage, pa.concat_tables(self.index))
        self.index, self.index_rows = [], 0

    def _publish(self, split: str | None, rows: int) -> None:
        """Publish the first ``rows`` waiting rows of ``split`` as one shard."""
        pending = self.pending[split]
        whole = pa.concat_tables(pending.tables, promote_options="permissive")
        name = layout.shard_name(self.run_id, self.shards, split)
        shard = whole.slice(0, rows)
        self.format.publish(storage.join(self.output, name), shard, self.storage)
        self.shards += 1
        self.report.files.append(name)
        self.index.append(shard_index.rows_of(name, shard))
        self.index_rows += rows
        if self.index_rows >= shard_index.FLUSH_ROWS:
            self._write_index()
        rest = whole.slice(rows)
        pending.tables, pending.rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
        pending.since = self.clock()


def _by_split(table: pa.Table) -> list[tuple[str | None, pa.Table]]:
    """The table's rows by split folder (sorted), or the whole table when it has no split column."""
    if layout.SPLIT_COLUMN not in table.column_names:
        return [(None, table)]
    splits = table.column(layout.SPLIT_COLUMN).to_pylist()
    folders = pa.array([layout.split_folder(None if s is None else str(s)) for s in splits], pa.string())
    return [(f, table.filter(pc.equal(folders, f))) for f in sorted(set(folders.to_pylist()))]
