"""The job's shard writer: a write task's table becomes shards of at most ``rows_per_shard`` rows
under OUTPUT/data/, each under a name that no other task or run uses, each published whole.

This module knows pyarrow and the storage layer, not Ray: the plan builder hands it tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import columns, layout, storage
from pipeline.output_schema import to_output_table
from pipeline.spec import StorageSpec
from pipeline.writers.parquet import ParquetWriter


@dataclass
class ShardReport:
    """What one write task wrote; the reports of all tasks add up to the run's stats."""

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


class ShardWriter:
    """Writes tables under OUTPUT/data/ as shards of at most ``rows_per_shard`` rows."""

    def __init__(self, output: str, storage_spec: StorageSpec, run_id: str, rows_per_shard: int):
        self.output = output
        self.storage = storage_spec
        self.run_id = run_id
        self.rows_per_shard = rows_per_shard
        self.format = ParquetWriter()

    def write(self, table: pa.Table, task_index: int) -> ShardReport:
        report = ShardReport(rows=table.num_rows)
        for name in table.column_names:
            if name.startswith(columns.ELAPSED_PREFIX):
                report.stage_busy_s[name[len(columns.ELAPSED_PREFIX):]] = float(pc.sum(table.column(name)).as_py() or 0)
        out = to_output_table(table)
        report.ok = int(pc.sum(pc.equal(out.column("status"), "ok")).as_py() or 0)
        chunk = 0
        for split, part in _by_split(out):
            for start in range(0, part.num_rows, self.rows_per_shard):
                name = layout.shard_name(self.run_id, task_index, chunk, split)
                self.format.publish(storage.join(self.output, name), part.slice(start, self.rows_per_shard),
                                    self.storage)
                report.files.append(name)
                chunk += 1
        return report


def _by_split(table: pa.Table) -> list[tuple[str | None, pa.Table]]:
    """The table's rows by split folder (sorted, so a retried task names its shards the same), or
    the whole table when it has no split column."""
    if layout.SPLIT_COLUMN not in table.column_names:
        return [(None, table)]
    splits = table.column(layout.SPLIT_COLUMN).to_pylist()
    folders = pa.array([layout.split_folder(None if s is None else str(s)) for s in splits], pa.string())
    return [(f, table.filter(pc.equal(folders, f))) for f in sorted(set(folders.to_pylist()))]
