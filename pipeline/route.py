"""Rows routed by their `task` column with `flows`: each flow's branch of the plan takes its own
rows before they are prepared and batched, so that every stage sees only its flow's rows and its
pipeline calls are full; the rows whose `task` names no flow take a branch of their own, where
they become error rows that say which flows exist."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.prepare import unrouted_batch


def rows_of(table: pa.Table, flow: str) -> pa.Table:
    """The rows of ``flow``."""
    return table.filter(pc.equal(table.column("task"), flow))


def unrouted(table: pa.Table, flows: list[str]) -> pa.Table:
    """The rows of no flow in ``flows``, as error rows (unrouted_batch)."""
    rows = table.filter(pc.invert(pc.fill_null(pc.is_in(table.column("task"), pa.array(flows)), False)))
    return unrouted_batch(rows, flows)
