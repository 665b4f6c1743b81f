"""Run one job from a spec: check, generate, write, summarise. The CLI and jobs/ call this."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pipeline import manifest, storage
from pipeline.errors import EXIT_OK, EXIT_ROWS_FAILED, ShardgenError, SpecError
from pipeline.models.resolve import check_sources
from pipeline.spec import JobSpec, StorageSpec, parse_spec_text


def load_spec(uri: str, **overrides: Any) -> JobSpec:
    """Read a YAML or JSON spec from a local path or object storage (credentials from AWS_*)."""
    try:
        text = storage.read_bytes(uri, StorageSpec()).decode("utf-8")
    except FileNotFoundError:
        raise SpecError(f"no job spec at {uri}") from None
    return parse_spec_text(text, uri, **overrides)


def _prepare_output(spec: JobSpec, overwrite: bool) -> dict | None:
    """Return the stats of an already finished output (nothing to do), else make room for a run."""
    fs, path = storage.filesystem(spec.output, spec.storage)
    if overwrite and fs.exists(path):
        fs.rm(path, recursive=True)
        return None
    if fs.exists(f"{path}/_SUCCESS"):
        import json

        return json.loads(fs.cat_file(f"{path}/_stats.json"))
    if fs.exists(f"{path}/data"):
        raise ShardgenError(
            f"output {spec.output} holds shards of a run that did not finish; pass --overwrite to start again"
        )
    return None


def run_job(spec: JobSpec, overwrite: bool = False, log=print) -> dict:
    """Run ``spec`` to completion and return its stats (see _stats.json)."""
    rows = manifest.check(spec)
    check_sources(spec)
    finished = _prepare_output(spec, overwrite)
    if finished is not None:
        log(f"shardgen: {spec.output} is already complete (run {finished['run_id']}); nothing to do "
            "(--overwrite starts again)")
        return {**finished, "skipped": True}
    from pipeline import plan, sink

    run_id = sink.new_run_id()
    log(f"shardgen: run {run_id}: {rows} rows from {spec.manifest} -> {spec.output}, "
        f"flows: {'; '.join(' -> '.join(s.kind for s in f) for f in spec.flow_map().values())}")
    started = datetime.now(timezone.utc)
    reports = plan.execute(spec, rows, run_id)
    return sink.finalize(spec, run_id, reports, started, datetime.now(timezone.utc))


def exit_code(stats: dict) -> int:
    return EXIT_OK if stats["error"] == 0 else EXIT_ROWS_FAILED


def summary_line(spec: JobSpec, stats: dict) -> str:
    rate = f"{stats['images_per_s']:.2f} images/s" if stats.get("images_per_s") else "n/a"
    line = (f"shardgen: {stats['rows']} rows ({stats['ok']} ok, {stats['error']} error) in "
            f"{stats['elapsed_s']:.1f} s, {rate} -> {spec.output}")
    if stats["error"]:
        line += f"\n  errors by kind: {stats['errors_by_kind']}"
    return line
