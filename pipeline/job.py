"""Run one job from a spec: check, generate, write, summarise. The CLI and jobs/ call this."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timezone
from typing import Any

from pipeline import layout, manifest, storage
from pipeline.errors import EXIT_OK, EXIT_ROWS_FAILED, SpecError
from pipeline.models.resolve import check_sources
from pipeline.spec import JobSpec, StorageSpec, parse_spec_text
from pipeline.stats import Stats


def load_spec(uri: str, night: date | str | None = None, **overrides: Any) -> JobSpec:
    """Read a YAML or JSON spec from a local path or object storage (credentials from AWS_*),
    for ``night`` where it is dated (pipeline/dates.py)."""
    try:
        text = storage.read_bytes(uri, StorageSpec()).decode("utf-8")
    except FileNotFoundError:
        raise SpecError(f"no job spec at {uri}") from None
    return parse_spec_text(text, uri, night, **overrides)


def _finished(spec: JobSpec, overwrite: bool) -> Stats | None:
    """Return the stats of an already finished output (nothing to do); with ``overwrite`` delete
    the output first."""
    fs, path = storage.filesystem(spec.output, spec.storage)
    with storage.guard("check", spec.output, spec.storage):
        if overwrite and fs.exists(path):
            fs.rm(path, recursive=True)
            return None
        if fs.exists(f"{path}/{layout.SUCCESS}"):
            return Stats.from_json(fs.cat_file(f"{path}/{layout.STATS}"))
    return None


def run_job(spec: JobSpec, overwrite: bool = False, log=print) -> Stats:
    """Run ``spec`` to completion and return its stats (see _stats.json). An output left by a run
    that did not finish is resumed: only the ids that no published shard holds are generated."""
    from pipeline.synth import filters

    ids = manifest.check(spec)
    if spec.filters:
        filters.check(spec)
    finished = _finished(spec, overwrite)
    if finished is not None:
        log(f"shardgen: {spec.output} is already complete (run {finished.run_id}); nothing to do "
            "(--overwrite starts again)")
        return replace(finished, skipped=True)
    check_sources(spec)
    from pipeline import job_record, plan, resume, sink

    written = resume.scan(spec, log)
    if written.files:
        resume.check_same_job(spec)
        resume.check_ids(written, ids, spec)
    todo = len(ids) - len(written.ids)
    run_id = sink.new_run_id()
    if written.files:
        log(f"shardgen: resuming {spec.output}: {len(written.ids)} of {len(ids)} ids are in "
            f"{len(written.files)} published shard(s); {todo} to go")
    log(f"shardgen: run {run_id}: {todo} rows from {spec.manifest} -> {spec.output}, "
        f"flows: {'; '.join(' -> '.join(s.kind for s in f) for f in spec.flow_map().values())}")
    started = datetime.now(timezone.utc)
    job_record.write_job_file(spec, run_id, started)
    reports = plan.execute(spec, todo, run_id, written.done()) if todo else []
    files, table = resume.settle(spec, written, [f for r in reports for f in r.files], len(ids), log)
    filtered = filters.apply(spec, files, log) if spec.filters else None
    return sink.finalize(spec, run_id, reports, files, table, started, datetime.now(timezone.utc), filtered)


def over_error_fraction(spec: JobSpec, stats: Stats) -> bool:
    """Whether a finished job has more error rows than its max_error_fraction tolerates."""
    return stats.error > spec.max_error_fraction * stats.rows


def exit_code(spec: JobSpec, stats: Stats) -> int:
    return EXIT_ROWS_FAILED if over_error_fraction(spec, stats) else EXIT_OK


def summary_line(spec: JobSpec, stats: Stats) -> str:
    rate = f"{stats.images_per_s:.2f} images/s" if stats.images_per_s else "n/a"
    line = (f"shardgen: {stats.rows} rows ({stats.ok} ok, {stats.error} error) in "
            f"{stats.elapsed_s:.1f} s, {rate} -> {spec.output}")
    if stats.error:
        line += f"\n  errors by kind: {stats.errors_by_kind}"
        share = stats.error / stats.rows
        verdict = "over" if over_error_fraction(spec, stats) else "within"
        line += f"\n  error rows: {share:.1%} of rows, {verdict} max_error_fraction {spec.max_error_fraction:g}"
    return line
