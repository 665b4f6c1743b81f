"""The names inside an output folder, in one place: every module that reads or writes an output
takes them from here.

OUTPUT/
  data/part-{run_id}-{number:06d}.parquet   the shards (published whole)
  data/{split}/part-….parquet    the same, when the manifest has a `split` column (one folder per split)
  _job.json      the spec as run, without credentials (written first, again at the end)
  _stats.json    the run's counts and times
  README.md      the dataset card
  _SUCCESS       written last: its absence means the job did not finish
  _index/*.parquet   while a job is unfinished: the id/status/error of published shards, so that a
                 resume reads a few files, not every shard (pipeline/shard_index.py); removed at the end
"""

from __future__ import annotations

import re

DATA = "data"
JOB = "_job.json"
STATS = "_stats.json"
CARD = "README.md"
SUCCESS = "_SUCCESS"
INDEX = "_index"
SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"


SPLIT_COLUMN = "split"
NO_SPLIT = "unsplit"  # the folder of rows whose split is null


def split_folder(split: str | None) -> str:
    """A split's folder name: the split with anything but letters, digits, '-' and '_' replaced,
    so that no value can point outside data/."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", split) if split else NO_SPLIT


def shard_name(run_id: str, number: int, split: str | None = None) -> str:
    """A shard's name relative to the output: the run's ``number``th shard, so no two shards of
    any runs collide. ``split``: its folder."""
    folder = f"{DATA}/{split}" if split else DATA
    return f"{folder}/{SHARD_PREFIX}{run_id}-{number:06d}{SHARD_SUFFIX}"


def split_of(name: str) -> str | None:
    """The split folder a shard lies in (see shard_name), or None."""
    parts = name.split("/")
    return parts[1] if len(parts) == 3 else None


def run_of(name: str) -> str:
    """The run that wrote a shard (see shard_name); run ids are {time}-{hex}."""
    return "-".join(name.rsplit("/", 1)[-1].removeprefix(SHARD_PREFIX).split("-")[:2])
