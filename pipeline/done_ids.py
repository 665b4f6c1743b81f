"""Skipping, on resume, the ids that published shards hold: a filter on every read block.

Two ways, chosen by one rule (``how``) from the number of done ids, and said in one line:

- **per block** (fewer than PARTITIONED_FROM done ids): the done ids travel to every read task as
  one Arrow array (put in the object store once, fetched once per node) and each block checks its
  ids against them (``drop_done``: pc.is_in, which builds a hash of all of them for every block);
- **partitioned** (from PARTITIONED_FROM): a range-partitioned anti-join whose build side stays put. The done
  ids are sorted and cut into ranges of at most IDS_PER_PARTITION, each held as a set by one
  DonePartition actor, built once; a block sends each of its ids to the actor whose range holds
  it and keeps the rows that no actor knows. A block's cost is its own rows and one call per
  partition its ids fall in, not the number of done ids; no task receives them all.

Ray Data's own ``Dataset.join(..., "left_anti")`` does not fit this job (Ray 2.60): its shuffle is
a barrier (no row leaves it before the whole manifest is read and partitioned, through the object
store), its map tasks ask for a whole CPU with no setting to lower it (the stage pools may hold all
of a node's CPUs but the light steps' quarter: it would wait forever), and it needs polars.

A row's seed and image derive from its id alone (pipeline/prepare.py derive_seed), and both ways
keep a block's rows in order: which way is used changes nothing in the output.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

# From this many done ids a resume uses the partitioned anti-join (measured: docs/performance.md,
# "Skipping done ids at resume"): below it the per-block hash costs about what the actors' calls do.
PARTITIONED_FROM = 100_000
# Done ids per DonePartition actor: about 100 bytes each as a Python set (400 MB an actor).
IDS_PER_PARTITION = 4_000_000

PER_BLOCK = "per block"
PARTITIONED = "partitioned"


def how(done: int) -> str:
    """The way a resume with ``done`` done ids skips them."""
    return PARTITIONED if done >= PARTITIONED_FROM else PER_BLOCK


def drop_done(table: pa.Table, done: pa.Array) -> pa.Table:
    """The rows of ``table`` whose id is not in ``done`` (the per-block way)."""
    return table.filter(pc.invert(pc.is_in(table.column("id"), value_set=done)))


def ranges(done: pa.Array, per_partition: int) -> tuple[list[pa.Array], list[str]]:
    """``done`` sorted and cut into partitions of at most ``per_partition`` ids, and the first id
    of every partition but the first: an id belongs to the partition ``partition_of`` names."""
    order = pc.sort_indices(done)
    # Each partition taken on its own: a slice would carry the whole array's buffers to its actor.
    parts = [done.take(order.slice(start, per_partition)) for start in range(0, len(order), per_partition)]
    return parts, [p[0].as_py() for p in parts[1:]]


def partition_of(ids: pa.Array, bounds: list[str]) -> np.ndarray:
    """For each of ``ids``, the index of the partition whose range holds it."""
    return np.searchsorted(np.array(bounds, dtype=object), ids.to_numpy(zero_copy_only=False), side="right")


@ray.remote(num_cpus=0)
class DonePartition:
    """One range of the done ids, as a set built once."""

    def __init__(self, ids: pa.Array):
        self.ids = set(ids.to_pylist())

    def known(self, ids: pa.Array) -> np.ndarray:
        """For each of ``ids``, whether it is done."""
        return np.fromiter((i in self.ids for i in ids.to_pylist()), dtype=bool, count=len(ids))


def drop_done_partitioned(table: pa.Table, bounds: list[str], partitions: list) -> pa.Table:
    """The rows of ``table`` whose id no DonePartition actor of ``partitions`` knows, in order."""
    ids = table.column("id").combine_chunks()
    where = partition_of(ids, bounds)
    asked = {p: np.flatnonzero(where == p) for p in np.unique(where)}
    answers = ray.get([partitions[p].known.remote(ids.take(pa.array(rows))) for p, rows in asked.items()])
    done = np.zeros(len(ids), dtype=bool)
    for rows, known in zip(asked.values(), answers):
        done[rows] = known
    return table.filter(pa.array(~done))


class DoneIds:
    """A run's done ids, ready for its read blocks: ``filter`` and its ``kwargs`` for map_batches
    (``filter`` None: nothing to skip). ``close`` ends the partition actors."""

    def __init__(self, done: pa.Array, log=print):
        self.count = len(done)
        self.how = how(self.count)
        self.actors: list = []
        if not self.count:
            self.filter, self.kwargs = None, {}
            return
        if self.how == PER_BLOCK:
            self.filter, self.kwargs = drop_done, {"done": done}
        else:
            parts, bounds = ranges(done, IDS_PER_PARTITION)
            # Spread over the nodes (together the sets hold about 100 bytes a done id); one on a
            # node the job loses starts again elsewhere from its ids, and the calls to it are retried.
            self.actors = [DonePartition.options(scheduling_strategy="SPREAD", max_restarts=-1,
                                                 max_task_retries=-1).remote(p) for p in parts]
            self.filter, self.kwargs = drop_done_partitioned, {"bounds": bounds, "partitions": self.actors}
        held = f" in {len(self.actors)} partition actor(s)" if self.actors else ""
        log(f"shardgen: skipping {self.count} done id(s) {self.how}{held} (partitioned from {PARTITIONED_FROM} "
            "done ids)")

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
