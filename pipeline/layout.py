"""The names inside an output folder, in one place: every module that reads or writes an output
takes them from here.

OUTPUT/
  data/part-{run_id}-{task:05d}-{chunk:04d}.parquet   the shards (published whole)
  _job.json      the spec as run, without credentials (written first, again at the end)
  _stats.json    the run's counts and times
  README.md      the dataset card
  _SUCCESS       written last: its absence means the job did not finish
"""

from __future__ import annotations

DATA = "data"
JOB = "_job.json"
STATS = "_stats.json"
CARD = "README.md"
SUCCESS = "_SUCCESS"
SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"


def shard_name(run_id: str, task_index: int, chunk: int) -> str:
    """A shard's name relative to the output; unique per run, write task and chunk, so a retried
    write task reuses it (idempotent) and no two tasks or runs collide."""
    return f"{DATA}/{SHARD_PREFIX}{run_id}-{task_index:05d}-{chunk:04d}{SHARD_SUFFIX}"


def run_of(name: str) -> str:
    """The run that wrote a shard (see shard_name); run ids are {time}-{hex}."""
    return "-".join(name.rsplit("/", 1)[-1].removeprefix(SHARD_PREFIX).split("-")[:2])
