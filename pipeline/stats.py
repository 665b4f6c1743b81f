"""A run's counts and times: what `_stats.json` holds, what run_job returns and the summary
line prints. One typed record, so no reader depends on string keys."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields


@dataclass
class StageStats:
    kind: str
    busy_s: float  # seconds of this stage's work summed over its rows, this run


@dataclass
class Stats:
    run_id: str  # the run that finished the output
    runs: list[str]  # every run whose shards the output holds, in order
    rows: int  # every row of the output, all runs
    ok: int
    error: int
    errors_by_kind: dict[str, int]  # error rows by the stage or field their message starts with
    shards: int
    rows_this_run: int
    elapsed_s: float  # this run's wall time
    images_per_s: float | None  # this run's ok images per second of wall time
    stages: list[StageStats] = field(default_factory=list)
    # With `filters:` (pipeline/synth/filters.py): rows = ok + error + filtered.
    filtered: int = 0
    filtered_by_reason: dict[str, int] = field(default_factory=dict)  # low_confidence, exact_/near_duplicate
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)  # label -> {ok, filtered, error}
    filter_pass_rate: float | None = None  # kept / rows with an image
    duplicate_rate: float | None = None  # exact and near duplicates / rows with an image
    skipped: bool = False  # the output was already complete: nothing ran

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("skipped")
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> "Stats":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["stages"] = [StageStats(**s) for s in data.get("stages", [])]
        return cls(**data)
