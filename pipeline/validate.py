"""`shardgen validate`: every check of a run that needs no generating, then the plan.

It refuses what `shardgen run` refuses, with the same message and exit code (the checks are
job.check's), loads no model, starts no local Ray and writes nothing.
"""

from __future__ import annotations

from collections import Counter

import pyarrow.compute as pc

from pipeline import access, job, layout, manifest, storage, vocabulary
from pipeline.models.resolve import check_sources
from pipeline.prepare import prepare_batch
from pipeline.spec import JobSpec, StageSpec

# Rows per flow run through the prepare step (limits, decoding of images and masks).
SAMPLE_ROWS = 200


def _output_state(spec: JobSpec, checked: job.Checked) -> str:
    if checked.finished is not None:
        return f"finished by run {checked.finished.run_id}: a rerun does nothing (--overwrite starts again)"
    fs, path = storage.filesystem(spec.output, spec.storage)
    with storage.guard("check", spec.output, spec.storage):
        shards = [f for f in fs.find(f"{path}/{layout.DATA}") if f.endswith(layout.SHARD_SUFFIX)] \
            if fs.exists(f"{path}/{layout.DATA}") else []
    if shards:
        return f"holds {len(shards)} shard(s) of an unfinished run of this spec: a run resumes it"
    return "new"


def _columns(spec: JobSpec) -> str:
    names = manifest.open_manifest(spec).schema.names
    read_as = manifest.read_names(spec, names)
    mapped = ", ".join(f"{column} -> {name}" for name, column in spec.columns.items())
    known = set(manifest.COLUMN_TYPES)
    passed = [c if n == c else f"{c} (as {n})" for c, n in read_as.items()
              if n not in known and c not in spec.columns.values()]
    text = f"columns {names}"
    if mapped:
        text += f"; mapped: {mapped}"
    if passed:
        text += f"; passed through: {', '.join(passed)}"
    overrides = manifest.overrides(spec)
    return text + (f"; per-row overrides: {', '.join(overrides)}" if overrides else
                   "; per-row overrides: none (every row runs at its stage's settings)")


def _stage(stage: StageSpec) -> str:
    recommended = stage.recommended
    mark = lambda field: " (recommended)" if field in recommended else ""  # noqa: E731
    text = f"{stage.kind}: {stage.model}, {stage.steps} steps, guidance {stage.guidance_scale:g}" \
           f"{mark('guidance_scale')}"
    if stage.kind == "text_to_image":
        text += f", {stage.width}x{stage.height}{mark('width')}"
    if stage.kind == "super_resolution":
        text += f", noise level {stage.noise_level}{mark('noise_level')}"
    if stage.kind in ("inpainting", "image_to_image"):
        text += f", strength {stage.strength:g}"
    low, high = stage.actors
    pool = f"{low}" if low == high else f"{low}..{high}"
    return (f"{text}; batches of {stage.batch_size}, {pool} actor(s) x {stage.cpus_per_actor:g} CPU, "
            f"{stage.gpus_per_actor:g} GPU")


def _sample(spec: JobSpec) -> tuple[int, Counter, list[str]]:
    """The prepare step on the first rows of each flow: rows tried, error rows by kind, examples."""
    table = manifest.read(spec, rows=SAMPLE_ROWS * len(spec.flow_map()))
    policy = access.for_job(spec)
    tried, kinds, examples = 0, Counter(), []
    for name, flow in spec.flow_map().items():
        rows = table if spec.flows is None else table.filter(pc.equal(table.column("task"), name))
        rows = rows.slice(0, SAMPLE_ROWS)
        if not rows.num_rows:
            continue
        out = prepare_batch(rows, flow, spec.storage, policy, spec.limits)
        tried += out.num_rows
        for row_id, error in zip(out.column("id").to_pylist(), out.column("error").to_pylist()):
            if error:
                kinds[error.split(":", 1)[0]] += 1
                if len(examples) < 5:
                    examples.append(f"{row_id!r}: {error}")
    return tried, kinds, examples


def validate(spec: JobSpec, log=print) -> None:
    """Check ``spec`` as `shardgen run` would, without generating, and print what a run would do.
    Raises the same errors as a run (exit 2 for a spec, manifest or model that cannot run)."""
    from pipeline import plan

    checked = job.check(spec)
    warnings = check_sources(spec, build=False) if checked.finished is None else []
    log(f"shardgen: manifest {spec.manifest}: {checked.rows} rows, {_columns(spec)}")
    log(f"  output {spec.output}: {_output_state(spec, checked)}")
    for warning in (*warnings, job.noise_warning(spec), vocabulary.warning(spec)):
        if warning:
            log(warning)
    have_cpu, have_gpu, node_cpu, where = plan.resources_for_run()
    fitted = plan.fit_resources(spec, have_cpu, have_gpu, node_cpu)
    log(f"  cluster: {where}: {have_cpu:g} CPUs, {have_gpu:g} GPUs")
    plan.check_fits(fitted, have_cpu, have_gpu, log)
    for name, flow in fitted.flow_map().items():
        log(f"  flow {name}:" if spec.flows is not None else "  stages:")
        for i, stage in enumerate(flow):
            log(f"    {i}. {_stage(stage)}")
    if checked.finished is None:
        tried, kinds, examples = _sample(spec)
        bad = sum(kinds.values())
        log(f"  sample: {bad} of the first {tried} rows would be error rows"
            + (f" {dict(kinds)}: " + "; ".join(examples) if bad else ""))
    shards = -(-checked.rows // spec.format.rows_per_shard)
    log(f"shardgen: valid: a run writes {checked.rows} rows in {shards} shard(s) of "
        f"{spec.format.rows_per_shard} rows to {spec.output} (the last may hold fewer, and a run slower than a "
        f"shard per {spec.format.publish_every_minutes:g} min publishes partial ones)")
