"""Finish the output once every shard is written: _stats.json, _job.json, the dataset card, then
_SUCCESS (written last: its absence means the run did not finish).

The shards themselves are written by pipeline/writers/; this module knows pyarrow and the
storage layer, not Ray.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from dataclasses import replace
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import layout
from pipeline.card import dataset_card
from pipeline.job_record import put_text, write_job_file
from pipeline.output_schema import FILTERED, status_counts
from pipeline.spec import JobSpec
from pipeline.stats import ActorMetrics, StageStats, Stats
from pipeline.synth import filters
from pipeline.synth.filters import FilterReport
from pipeline.writers.shards import ShardReport, combine


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def _error_kind(message: str) -> str:
    return message.split(":", 1)[0] if message else "unknown"


def _kinds(written: pa.Table, status: str) -> Counter:
    """The kinds of the messages in `error` of the rows of ``status``, counted."""
    of = written.column("error").filter(pc.equal(written.column("status"), status)).drop_null()
    return Counter(_error_kind(m) for m in of.to_pylist())


def finalize(spec: JobSpec, run_id: str, reports: list[ShardReport], files: list[str], written: pa.Table,
             started: datetime, ended: datetime, filtered: FilterReport | None = None,
             actors: list[ActorMetrics] | None = None) -> Stats:
    """Write _stats.json, _job.json and README.md, then _SUCCESS; return the stats.

    ``files`` and ``written`` (their id, status and error columns) are every shard of the output,
    resumed runs' included; ``reports`` are this run's writes, for its speed and stage times;
    ``filtered`` is what the filters did (its status column replaces ``written``'s); ``actors`` are
    the figures the stage actors of this run reported."""
    this_run = combine(reports)
    wall = (ended - started).total_seconds()
    if filtered is not None:
        written = filtered.written
    counts = status_counts(written)
    ok, n_filtered = counts.get("ok", 0), counts.get(FILTERED, 0)
    errors = dict(_kinds(written, "error"))
    # Rows a stage's safety checker filtered say why in `error`; those the filters did, in filter_reason.
    by_reason = _kinds(written, FILTERED)
    by_reason.update(filtered.by_reason if filtered else {})
    runs = sorted({layout.run_of(name) for name in files} | {run_id})
    stats = Stats(
        run_id=run_id,
        runs=runs,
        rows=written.num_rows,
        ok=ok,
        error=written.num_rows - ok - n_filtered,
        errors_by_kind=errors,
        shards=len(files),
        rows_this_run=this_run.rows,
        elapsed_s=round(wall, 3),
        images_per_s=round(this_run.ok / wall, 3) if wall > 0 else None,
        stages=[StageStats.of(kind, round(this_run.stage_busy_s.get(kind, 0.0), 3), actors or [])
                for kind in dict.fromkeys(s.kind for s in spec.all_stages())],
        filtered=n_filtered,
        filtered_by_reason=dict(by_reason),
    )
    if filtered is not None:
        stats = replace(stats, per_class=filtered.per_class, filter_pass_rate=filters.pass_rate(filtered),
                        duplicate_rate=filters.duplicate_rate(filtered))
    put_text(spec, layout.STATS, stats.to_json())
    write_job_file(spec, run_id, started, ended, runs)
    put_text(spec, layout.CARD, dataset_card(spec, stats, files))
    put_text(spec, layout.SUCCESS, json.dumps({"run_id": run_id, "rows": written.num_rows}) + "\n")
    return stats
