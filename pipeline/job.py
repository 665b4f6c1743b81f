"""Run one job from a spec: check, generate, write, summarise. The CLI and jobs/ call this."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from datetime import date, datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import layout, manifest, resume, storage, vocabulary
from pipeline.errors import EXIT_OK, EXIT_ROWS_FAILED, SpecError
from pipeline.models.resolve import check_sources
from pipeline.spec import JobSpec, StorageSpec, parse_spec_text
from pipeline.stats import StageStats, Stats


def load_spec(uri: str, night: date | str | None = None, **overrides: Any) -> JobSpec:
    """Read a YAML or JSON spec from a local path or object storage (credentials from AWS_*),
    for ``night`` where it is dated (pipeline/dates.py)."""
    try:
        text = storage.read_bytes(uri, StorageSpec()).decode("utf-8")
    except FileNotFoundError:
        raise SpecError(f"no job spec at {uri}") from None
    return parse_spec_text(text, uri, night, **overrides)


def _delete_output(spec: JobSpec) -> None:
    fs, path = storage.filesystem(spec.output, spec.storage)
    with storage.guard("check", spec.output, spec.storage):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def finished_stats(spec: JobSpec) -> Stats | None:
    """The stats of an already finished output (one with _SUCCESS), else None."""
    fs, path = storage.filesystem(spec.output, spec.storage)
    with storage.guard("check", spec.output, spec.storage):
        if fs.exists(f"{path}/{layout.SUCCESS}"):
            return Stats.from_json(fs.cat_file(f"{path}/{layout.STATS}"))
    return None


def noise_warning(spec: JobSpec) -> str | None:
    """One line naming the random-weight built-ins the job runs, if any."""
    noisy = list(dict.fromkeys(s.model for s in spec.all_stages() if s.draws_noise))
    if not noisy:
        return None
    return (f"shardgen: warning: {', '.join(noisy)} {'has' if len(noisy) == 1 else 'have'} random weights and "
            "draw(s) noise, not pictures (for testing the plumbing); leave `model` unset for the trained built-in")


@dataclass
class Checked:
    """What the checks before a run found: the manifest's row count and the output's state."""

    rows: int
    finished: Stats | None  # the output is complete: nothing to do


def check(spec: JobSpec, overwrite: bool = False) -> Checked:
    """What refuses a job (exit 2) before it touches Ray: the manifest's columns and ids, an output
    written by another spec. With ``overwrite``, the output is deleted once the manifest passed;
    without, nothing is written. The model sources are checked next (check_sources).

    A finished output of the same spec answers from _SUCCESS, _stats.json and _job.json alone:
    its manifest was checked by the run that wrote it, and is not read again."""
    if not overwrite:
        finished = finished_stats(spec)
        if finished is not None:
            resume.check_same_job(spec)
            return Checked(finished.rows, finished)
    rows = manifest.check(spec)
    if spec.filters:
        from pipeline.synth import filters

        filters.check(spec)
    if overwrite:
        _delete_output(spec)
    resume.check_same_job(spec)
    return Checked(rows, finished_stats(spec))


def stage_totals(spec: JobSpec, todo: int, done: pa.Array) -> dict[str, int]:
    """How many of the rows to generate each stage kind will see."""
    if spec.flows is None:
        return {s.kind: todo for s in spec.stages}
    table = manifest.read(spec, ["id", "task"])
    todo_tasks = table.filter(pc.invert(pc.is_in(table.column("id"), value_set=done))).column("task")
    tasks = Counter(todo_tasks.to_pylist())
    totals: dict[str, int] = {}
    for name, flow in spec.flows.items():
        for kind in dict.fromkeys(s.kind for s in flow):
            totals[kind] = totals.get(kind, 0) + tasks.get(name, 0)
    return totals


def run_job(spec: JobSpec, overwrite: bool = False, log=print, verbose: bool = False) -> Stats:
    """Run ``spec`` to completion and return its stats (see _stats.json). An output left by a run
    that did not finish is resumed: only the ids that no published shard holds are generated."""
    checked = check(spec, overwrite)
    if checked.finished is not None:
        log(f"shardgen: {spec.output} is already complete (run {checked.finished.run_id}); nothing to do "
            "(--overwrite starts again)")
        return replace(checked.finished, skipped=True)
    from pipeline.cluster import check_address

    check_address()  # a cluster that does not answer fails in seconds, before the models' imports
    warnings = check_sources(spec)
    for warning in (*warnings, noise_warning(spec), vocabulary.warning(spec)):
        if warning:
            log(warning)
    from pipeline import job_record, plan, sink
    from pipeline.synth import filters

    written = resume.scan(spec, log)
    if written.files:
        resume.check_ids(written, spec)
    done = written.done()
    todo = checked.rows - len(done)
    run_id = sink.new_run_id()
    if written.files:
        log(f"shardgen: resuming {spec.output}: {len(done)} of {checked.rows} ids are in "
            f"{len(written.files)} published shard(s); {todo} to go")
    log(f"shardgen: run {run_id}: {todo} rows from {spec.manifest} -> {spec.output}, "
        f"flows: {'; '.join(' -> '.join(s.kind for s in f) for f in spec.flow_map().values())}")
    started = datetime.now(timezone.utc)
    job_record.write_job_file(spec, run_id, started)
    executed = plan.Executed()
    if todo:
        totals = stage_totals(spec, todo, done)
        executed = plan.execute(spec, todo, run_id, done, totals, verbose=verbose, log=log)
    files, table = resume.settle(spec, written, [f for r in executed.reports for f in r.files], checked.rows, log)
    filtered = filters.apply(spec, files, log) if spec.filters else None
    return sink.finalize(spec, run_id, executed.reports, files, table, started, datetime.now(timezone.utc), filtered,
                         executed.actors)


def over_error_fraction(spec: JobSpec, stats: Stats) -> bool:
    """Whether a finished job has more error rows than its max_error_fraction tolerates."""
    return stats.error > spec.max_error_fraction * stats.rows


def exit_code(spec: JobSpec, stats: Stats) -> int:
    return EXIT_ROWS_FAILED if over_error_fraction(spec, stats) else EXIT_OK


def _stage_figures(st: StageStats) -> str:
    """Where one stage's actor time went, for the summary line."""
    text = (f"{st.kind} ({st.actors} actor{'s' if st.actors > 1 else ''}): load {st.load_s:.1f} s, first image "
            f"{st.first_image_s:.1f} s, in pipeline {st.pipeline_s:.1f} s, waiting for input {st.wait_s:.1f} s")
    if st.calls:
        text += f", {st.call_rows} rows in {st.calls} calls (fill {st.fill:.0%})"
    if st.gpu_busy is not None:
        text += f", GPU busy {st.gpu_busy:.0%}, peak {st.peak_gpu_memory_gb:g} GB"
    return text


def summary_line(spec: JobSpec, stats: Stats) -> str:
    rate = f"{stats.images_per_s:.2f} images/s" if stats.images_per_s else "n/a"
    filtered = f", {stats.filtered} filtered {stats.filtered_by_reason}" if stats.filtered else ""
    counts = f"{stats.rows} rows ({stats.ok} ok, {stats.error} error{filtered})"
    if len(stats.runs) > 1:  # a resume: this run's rows and rate, the output's total apart
        line = (f"shardgen: {stats.rows_this_run} rows this run in {stats.elapsed_s:.1f} s, {rate}; the output "
                f"holds {counts} from {len(stats.runs)} runs -> {spec.output}")
    else:
        line = f"shardgen: {counts} in {stats.elapsed_s:.1f} s, {rate} -> {spec.output}"
    timed = [_stage_figures(st) for st in stats.stages if st.actors]
    if timed:
        line += "\n  stages: " + "; ".join(timed)
    if stats.error:
        line += f"\n  errors by kind: {stats.errors_by_kind}"
        share = stats.error / stats.rows
        verdict = "over" if over_error_fraction(spec, stats) else "within"
        line += f"\n  error rows: {share:.1%} of rows, {verdict} max_error_fraction {spec.max_error_fraction:g}"
    return line
