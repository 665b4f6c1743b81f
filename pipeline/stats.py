"""A run's counts and times: what `_stats.json` holds, what run_job returns and the summary
line prints. One typed record, so no reader depends on string keys."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields


@dataclass
class ActorMetrics:
    """One stage actor's figures (measured by pipeline/stages/metrics.py)."""

    kind: str
    load_s: float = 0.0  # the constructor: resolve, load, place, tune and (compile) warm up the model
    first_image_s: float | None = None  # from the constructor's start to the end of the first batch
    pipeline_s: float = 0.0  # inside pipeline calls
    wait_s: float = 0.0  # between the end of one batch and the start of the next: waiting for input
    batches: int = 0
    rows: int = 0
    gpu_busy: float | None = None  # NVML utilisation from the first batch's start to the last one's end
    peak_gpu_memory_gb: float | None = None  # torch's peak allocation on the actor's GPU
    calls: int = 0  # pipeline calls, retries included
    call_rows: int = 0  # rows in those calls (a compiled call's padding left out)
    call_capacity: int = 0  # the rows those calls could have held: the actor's batch size at each call, summed
    batch_size: int | None = None  # the actor's batch size at its end (probed with `batch_size: auto`)
    probed_batch_size: int | None = None  # what the start-up probe found (`batch_size: auto` on a GPU)
    batch_halvings: int = 0  # out-of-memory calls that halved the actor's batch size


@dataclass
class StageStats:
    kind: str
    busy_s: float  # seconds of this stage's work summed over its rows, this run
    # From the stage's actors this run (None: no actor reported, e.g. every row was done before):
    actors: int = 0
    load_s: float | None = None  # the slowest actor's start-up (model load, compile)
    first_image_s: float | None = None  # the earliest first batch out, from its actor's start
    pipeline_s: float | None = None  # inside pipeline calls, all actors
    wait_s: float | None = None  # waiting for input between batches, all actors
    gpu_busy: float | None = None  # mean NVML utilisation over the actors' working time (GPUs only)
    peak_gpu_memory_gb: float | None = None  # the largest actor's peak allocation (GPUs only)
    calls: int | None = None  # pipeline calls, all actors
    call_rows: int | None = None  # rows in those calls
    fill: float | None = None  # rows per call over the batch size then: 1.0 when every call was full
    batch_size: int | None = None  # the smallest batch size an actor ended with
    probed_batch_size: int | None = None  # the smallest an actor's start-up probe found (`batch_size: auto`)
    batch_halvings: int | None = None  # out-of-memory calls that halved an actor's batch size, all actors

    @classmethod
    def of(cls, kind: str, busy_s: float, actors: list[ActorMetrics]) -> "StageStats":
        mine = [a for a in actors if a.kind == kind]
        if not mine:
            return cls(kind, busy_s)
        busy = [(a.gpu_busy, a.pipeline_s + a.wait_s) for a in mine if a.gpu_busy is not None]
        weight = sum(w for _, w in busy)
        capacity = sum(a.call_capacity for a in mine)
        return cls(
            kind, busy_s, actors=len(mine), load_s=max(a.load_s for a in mine),
            first_image_s=min((a.first_image_s for a in mine if a.first_image_s is not None), default=None),
            pipeline_s=round(sum(a.pipeline_s for a in mine), 3), wait_s=round(sum(a.wait_s for a in mine), 3),
            gpu_busy=round(sum(b * w for b, w in busy) / weight, 3) if busy and weight else None,
            peak_gpu_memory_gb=max((a.peak_gpu_memory_gb for a in mine if a.peak_gpu_memory_gb is not None),
                                   default=None),
            calls=sum(a.calls for a in mine), call_rows=sum(a.call_rows for a in mine),
            fill=round(sum(a.call_rows for a in mine) / capacity, 3) if capacity else None,
            batch_size=min((a.batch_size for a in mine if a.batch_size is not None), default=None),
            probed_batch_size=min((a.probed_batch_size for a in mine if a.probed_batch_size is not None),
                                  default=None),
            batch_halvings=sum(a.batch_halvings for a in mine),
        )


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
    # rows = ok + error + filtered: rows a stage's `safety_checker: filter` flagged, or `filters:`
    # (pipeline/synth/filters.py) marked.
    filtered: int = 0
    # safety_checker; low_confidence, exact_/near_duplicate
    filtered_by_reason: dict[str, int] = field(default_factory=dict)
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
