"""`shardgen bench`: the pipeline's steady throughput against a plain diffusers loop over the
same rows and model, measured in one run on one machine, so that only ratios are compared.

Steady throughput leaves out start-up (Ray, actors, model loads): it counts the rows finished
after the first batch, over the time from the end of the first batch to the end of the last (for
a pool of N actors, after the first N batches: each actor's first).

Each pair runs in rounds, the rows cut into as many parts: a round runs the plain loop and the
shardgen job on its part back to back, the two in turn first, and the pair's ratio is the median
of its rounds' ratios. On a machine whose CPU share drifts over minutes (a virtual machine on a
busy host), the two sides of a round see the same share, which two runs minutes apart do not.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import layout
from pipeline.demo import sample_prompts
from pipeline.errors import SpecError
from pipeline.job import run_job
from pipeline.models.resolve import resolve
from pipeline.prepare import derive_seed
from pipeline.spec import JobSpec, StageSpec, parse_spec
from pipeline.stages.generators import row_generator


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
    times = [t.timestamp() for t in table.column("created_at").to_pylist()]
    return Result(name, table.num_rows, steady_rate(times, spec.stages[0].actors[0]), wall)


def steady_rate(times: list[float], actors: int) -> float:
    """Rows a second from the end of each actor's first batch to the last row: ``times`` are the
    rows' finish times, a batch's rows sharing its time. With a pool of N actors the steady state
    starts at the N-th batch out; counting from the first would credit the others' first batches to
    the window's first moments."""
    batches = sorted(set(times))
    start = batches[min(actors, len(batches)) - 1]
    later = [t for t in times if t > start]
    return len(later) / (batches[-1] - start)


BATCH = 8
# Each shardgen variant, the plain loop it is compared with, and the ratio's label.
PAIRS = [
    ("shardgen, 1 actor x 1 CPU, one row per call (batch-invariant, the CPU default)", {},
     {"threads": 1, "per_row": True}, "shardgen / plain loop, one row per call, 1 thread"),
    ("shardgen, 1 actor x 1 CPU, batched", {"batch_invariant": False},
     {"threads": 1, "per_row": False}, "shardgen / plain loop, batched, 1 thread"),
    # Like with like: both sides batched, so that the pair measures two actors against two threads
    # (one row per call against batches is the first two pairs' difference).
    ("shardgen, 2 actors x 0.75 CPU, batched", {"actors": 2, "cpus_per_actor": 0.75, "batch_invariant": False},
     {"threads": 2, "per_row": False}, "shardgen 2 actors / plain loop batched 2 threads"),
]


@dataclass
class Pair:
    """One of PAIRS measured: each side's rounds and the ratio of each round."""

    plain: list[Result]
    mine: list[Result]

    @property
    def ratios(self) -> list[float]:
        return [m.steady_images_per_s / p.steady_images_per_s for p, m in zip(self.plain, self.mine)]

    @staticmethod
    def overall(rounds: list[Result]) -> Result:
        """A side's figures over its rounds: every row and the wall time, its median steady rate."""
        return Result(rounds[0].name, sum(r.rows for r in rounds),
                      statistics.median(r.steady_images_per_s for r in rounds), sum(r.wall_s for r in rounds))


def run(rows: int, folder: Path, steps: int = 20, pairs: int = len(PAIRS), rounds: int = 4) -> list[Pair]:
    """Each of the first ``pairs`` of PAIRS, in ``rounds`` rounds over as many parts of the rows."""
    from pipeline.plan import ensure_ray

    prompts = sample_prompts(rows)
    ids = [f"bench-{i:05d}" for i in range(rows)]
    cuts = [round(rows * k / rounds) for k in range(rounds + 1)]
    parts = []
    for k in range(rounds):
        lo, hi = cuts[k], cuts[k + 1]
        manifest = folder / f"manifest-{k}.parquet"
        pq.write_table(pa.table({"id": ids[lo:hi], "prompt": prompts[lo:hi]}), manifest)
        parts.append((manifest, prompts[lo:hi], ids[lo:hi]))
    base = parse_spec({
        "manifest": str(parts[0][0]),
        "output": str(folder / "dataset"),
        "stages": [{"kind": "text_to_image", "steps": steps, "width": 64, "height": 64, "batch_size": BATCH}],
    })
    stage = base.stages[0]
    ensure_ray()
    measured = []
    for name, extra, loop, _ in PAIRS[:pairs]:
        pair = Pair([], [])
        for k, (manifest, part_prompts, part_ids) in enumerate(parts):
            spec = base.model_copy(update={"manifest": str(manifest),
                                           "stages": [StageSpec(**{**stage.model_dump(), **extra})]})
            for side in ("plain", "mine") if k % 2 == 0 else ("mine", "plain"):  # each side first in turn
                if side == "plain":
                    pair.plain.append(plain_loop(base, part_prompts, part_ids, **loop))
                else:
                    pair.mine.append(pipeline_run(spec, name))
        measured.append(pair)
    return measured


def main(rows: int, out: str | None, steps: int = 20, quick: bool = False, rounds: int = 4) -> None:
    """``quick``: the first pair only (the CPU default against its plain loop), in one round."""
    rounds = 1 if quick else rounds
    if rows // rounds < 2 * BATCH:
        raise SpecError(f"bench: --rows {rows} in {rounds} round(s) is {rows // rounds} rows a round; a steady rate "
                        f"needs at least {2 * BATCH} (two batches of {BATCH})")
    with tempfile.TemporaryDirectory() as tmp:
        pairs = run(rows, Path(tmp), steps, pairs=1 if quick else len(PAIRS), rounds=rounds)
    results = [Pair.overall(p.plain) for p in pairs] + [Pair.overall(p.mine) for p in pairs]
    width = max(len(r.name) for r in results)
    print(f"\n{'what':<{width}}  rows  steady img/s  wall s")
    for r in results:
        print(f"{r.name:<{width}}  {r.rows:4d}  {r.steady_images_per_s:12.2f}  {r.wall_s:6.1f}")
    labels = [label + ":" for *_, label in PAIRS]
    if len(pairs[0].ratios) > 1:
        print("\nratio in each round (plain loop first in rounds 1, 3, ...; the median is the pair's ratio):")
        for pair, label in zip(pairs, labels):
            print(f"  {label:<{max(map(len, labels))}} {'  '.join(f'{r:.2f}' for r in pair.ratios)}")
    print()
    for pair, label in zip(pairs, labels):
        print(f"ratio {label:<{max(map(len, labels))}} {statistics.median(pair.ratios):.2f}")
    if out:
        Path(out).write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n")
