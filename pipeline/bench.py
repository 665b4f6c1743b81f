"""`shardgen bench`: the pipeline's steady throughput against a plain diffusers loop over the
same rows and model, measured in one run on one machine, so that only ratios are compared.

Steady throughput leaves out start-up (Ray, actors, model loads): it counts the rows finished
after the first batch, over the time from the end of the first batch to the end of the last.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import layout
from pipeline.demo import sample_prompts
from pipeline.job import run_job
from pipeline.models.resolve import resolve
from pipeline.prepare import derive_seed
from pipeline.spec import JobSpec, StageSpec, parse_spec
from pipeline.stages.base import row_generator


@dataclass
class Result:
    name: str
    rows: int
    steady_images_per_s: float
    wall_s: float


def plain_loop(spec: JobSpec, prompts: list[str], ids: list[str], threads: int, per_row: bool) -> Result:
    """What a user writes without shardgen: load the pipeline, loop over batches."""
    from diffusers import AutoPipelineForText2Image

    stage = spec.stages[0]
    torch.set_num_threads(threads)
    start = time.perf_counter()
    pipe = AutoPipelineForText2Image.from_pretrained(resolve(stage.model), use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    step = 1 if per_row else stage.batch_size
    first_batch_end, done = None, 0
    with torch.inference_mode():
        for lo in range(0, len(prompts), step):
            hi = min(lo + step, len(prompts))
            pipe(prompt=prompts[lo:hi], negative_prompt=[""] * (hi - lo), num_inference_steps=stage.steps,
                 guidance_scale=stage.guidance_scale, width=stage.width, height=stage.height,
                 generator=[row_generator(derive_seed(i)) for i in ids[lo:hi]], output_type="np")
            if first_batch_end is None and hi >= stage.batch_size:
                first_batch_end, done = time.perf_counter(), hi
    end = time.perf_counter()
    name = f"plain diffusers loop, {threads} thread(s), {'one row per call' if per_row else f'batch {step}'}"
    return Result(name, len(prompts), (len(prompts) - done) / (end - first_batch_end), end - start)


def pipeline_run(spec: JobSpec, name: str) -> Result:
    start = time.perf_counter()
    run_job(spec, overwrite=True, log=lambda _: None)
    wall = time.perf_counter() - start
    table = pq.read_table(Path(spec.output) / layout.DATA, columns=["created_at"])
    times = sorted(t.timestamp() for t in table.column("created_at").to_pylist())
    first = times[0]
    later = [t for t in times if t > first]
    return Result(name, table.num_rows, len(later) / (times[-1] - first), wall)


# Each shardgen variant, the plain loop it is compared with, and the ratio's label.
PAIRS = [
    ("shardgen, 1 actor x 1 CPU, one row per call (batch-invariant, the CPU default)", {},
     {"threads": 1, "per_row": True}, "shardgen / plain loop, one row per call, 1 thread"),
    ("shardgen, 1 actor x 1 CPU, batched", {"batch_invariant": False},
     {"threads": 1, "per_row": False}, "shardgen / plain loop, batched, 1 thread"),
    ("shardgen, 2 actors x 0.75 CPU, one row per call", {"actors": 2, "cpus_per_actor": 0.75},
     {"threads": 2, "per_row": False}, "shardgen 2 actors / plain loop batched 2 threads"),
]


def run(rows: int, folder: Path, steps: int = 20, pairs: int = len(PAIRS)) -> list[tuple[Result, Result]]:
    """(plain loop, shardgen) for each of the first ``pairs`` of PAIRS."""
    from pipeline.plan import ensure_ray

    prompts = sample_prompts(rows)
    ids = [f"bench-{i:05d}" for i in range(rows)]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), folder / "manifest.parquet")
    base = parse_spec({
        "manifest": str(folder / "manifest.parquet"),
        "output": str(folder / "dataset"),
        "stages": [{"kind": "text_to_image", "steps": steps, "width": 64, "height": 64, "batch_size": 8}],
    })
    stage = base.stages[0]
    ensure_ray()
    results = []
    # Each ratio's two sides run back to back: a machine whose load changes during the bench gives
    # both the same share of it.
    for name, extra, loop, _ in PAIRS[:pairs]:
        plain = plain_loop(base, prompts, ids, **loop)
        spec = base.model_copy(update={"stages": [StageSpec(**{**stage.model_dump(), **extra})]})
        results.append((plain, pipeline_run(spec, name)))
    return results


def main(rows: int, out: str | None, steps: int = 20, quick: bool = False) -> None:
    """``quick``: the first pair only (the CPU default against its plain loop)."""
    with tempfile.TemporaryDirectory() as tmp:
        pairs = run(rows, Path(tmp), steps, pairs=1 if quick else len(PAIRS))
    results = [plain for plain, _ in pairs] + [mine for _, mine in pairs]
    width = max(len(r.name) for r in results)
    print(f"\n{'what':<{width}}  rows  steady img/s  wall s")
    for r in results:
        print(f"{r.name:<{width}}  {r.rows:4d}  {r.steady_images_per_s:12.2f}  {r.wall_s:6.1f}")
    labels = [label + ":" for *_, label in PAIRS]
    print()
    for (plain, mine), label in zip(pairs, labels):
        ratio = mine.steady_images_per_s / plain.steady_images_per_s
        print(f"ratio {label:<{max(map(len, labels))}} {ratio:.2f}")
    if out:
        Path(out).write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n")
