"""Rows routed by their `task` column with `flows`: all rows go down one chain of steps, so the
manifest is read and prepared once (a branch per flow would make Ray Data read it once per
branch). Prepare treats each row by the rules of its own flow, and each stage generates only the
rows of its flow, passing the others on as they came."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from pipeline.access import Access
from pipeline.prepare import prepare_batch, unrouted_batch
from pipeline.spec import LimitsSpec, StageSpec, StorageSpec
from pipeline.tables import values


def flow_of(table: pa.Table, names: list[str]) -> list[str | None]:
    """Each row's flow; None where its `task` names none."""
    return [t if t in names else None for t in values(table, "task")]


def _merge(parts: list[tuple[list[int], pa.Table]]) -> pa.Table:
    """The parts' rows back in the order of the batch they were taken from (``parts`` give each
    part's row positions in it); a column only some parts have is null in the others."""
    table = pa.concat_tables([t for _, t in parts], promote_options="permissive")
    return table.take(np.argsort(np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in parts]), kind="stable"))


def prepare(table: pa.Table, flows: dict[str, list[StageSpec]], storage: StorageSpec, access: Access,
            limits: LimitsSpec) -> pa.Table:
    """prepare_batch for each flow's rows; rows of no flow become error rows (unrouted_batch)."""
    names = sorted(flows)
    groups: dict[str | None, list[int]] = {}
    for i, name in enumerate(flow_of(table, names)):
        groups.setdefault(name, []).append(i)
    return _merge([(rows, unrouted_batch(table.take(rows), names) if name is None
                    else prepare_batch(table.take(rows), flows[name], storage, access, limits))
                   for name, rows in groups.items()])


def only(flow: str, stage: Callable[[pa.Table], pa.Table], table: pa.Table) -> pa.Table:
    """``stage`` applied to the rows of ``flow`` alone; the other rows unchanged, so a row's image
    depends on its own flow's stages and never on the other flows' rows in its batch."""
    mine = [i for i, t in enumerate(values(table, "task")) if t == flow]
    if len(mine) == table.num_rows:
        return stage(table)
    if not mine:
        return table
    others = sorted(set(range(table.num_rows)) - set(mine))
    return _merge([(mine, stage(table.take(mine))), (others, table.take(others))])
