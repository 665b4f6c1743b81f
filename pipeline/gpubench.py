"""`shardgen bench --gpu`: shardgen against a plain diffusers loop on the Stable Diffusion 1.5 and
SDXL architectures (random weights, built offline), measured in one run on one machine.

For each architecture it measures the plain loop (what a user writes: load, loop over batches),
the same loop with channels_last and torch.compile, a whole shardgen job (read manifest ->
generate -> encode PNG -> write shards) with shardgen's defaults (`batch_size: auto` among them)
on the same prompts and seeds, then the job again with each per-stage speed choice alone
(CHOICES; a choice the architecture cannot take is refused by shardgen, and the row says so);
and prints images/s in steady state, the ratio to the plain loop, MFU against the counted FLOPs,
the GPU's busy share, the time to the first image, peak memory, and how far shardgen's images
are from the loop's, as a table and as the markdown table docs/performance.md holds. Systems
that would start after BUDGET_S are skipped and say so, so that one run fits its machine time.

``--quick`` runs tiny models of the same architectures on any device in about a minute: it is
what the test suite calls, for the run and the shape of its JSON, not for the figures.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import torch

from pipeline import layout
from pipeline.demo import sample_prompts
from pipeline.gpu_sampler import GpuSampler
from pipeline.models import reference
from pipeline.prepare import derive_seed
from pipeline.stages.base import to_uint8
from pipeline.stages.generators import row_generator


@dataclass(frozen=True)
class Workload:
    arch: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    batch_size: int
    images: int  # at least two batches: steady state starts after the first


FULL = (Workload("sd15", 512, 512, 25, 7.5, 32, 192), Workload("sdxl", 1024, 1024, 30, 7.5, 8, 24))
# The per-stage speed choices, each measured alone as a shardgen job: (name, stage fields).
CHOICES = (
    ("compile: true", {"compile": True}),
    ("compile: regional", {"compile": "regional"}),
    ("attention_backend: _native_cudnn", {"attention_backend": "_native_cudnn"}),
    ("cache: first_block 0.05", {"cache": {"method": "first_block", "threshold": 0.05}}),
)
# No system starts after this many seconds of the run (scripts/gpu_bench.sh stops it at 480).
BUDGET_S = 400
QUICK = (Workload("sd15", 64, 64, 4, 7.5, 4, 12), Workload("sdxl", 64, 64, 4, 7.5, 4, 12))


@dataclass
class Measure:
    system: str
    arch: str
    images: int
    images_per_s: float | None = None  # steady state: after the first batch
    ratio_to_plain: float | None = None
    mfu: float | None = None  # counted FLOPs per second over the device's measured peak
    gpu_busy: float | None = None  # share of the steady-state time a kernel ran (NVML)
    first_image_s: float | None = None  # from the start of loading to the first finished batch
    peak_memory_gb: float | None = None  # device memory in use at its peak (NVML; the whole GPU)
    wall_s: float | None = None
    min_psnr_db: float | None = None  # shardgen's images against the plain loop's (inf: identical)
    note: str = ""


@dataclass
class Report:
    device: str
    dtype: str
    peak_tflops: float
    quick: bool
    workloads: list[dict] = field(default_factory=list)
    results: list[Measure] = field(default_factory=list)


def peak_tflops(device: str, dtype: torch.dtype) -> float:
    """The device's matmul throughput in this dtype, measured: the denominator of MFU."""
    n = 8192 if device == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    reps, start = (50 if device == "cuda" else 5), time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return round(2 * n**3 * reps / (time.perf_counter() - start) / 1e12, 2)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def flops_per_image(pipe, w: Workload) -> float:
    """Counted FLOPs of one image (text encoders, the U-Net pair of every step, the VAE decoder):
    two counted calls, with one and two steps, give the per-step and the fixed part."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for steps in (1, 2):
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            pipe(prompt="a red circle", negative_prompt="", num_inference_steps=steps, guidance_scale=w.guidance_scale,
                 width=w.width, height=w.height, output_type="np")
        counts.append(counter.get_total_flops())
    per_step = counts[1] - counts[0]
    return float(counts[0] - per_step + per_step * w.steps)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def _load(folder: Path, device: str, dtype: torch.dtype):
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                                     local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_loop(folder: Path, w: Workload, rows: list[tuple[str, str]], device: str, dtype: torch.dtype,
               compiled: bool, sampler: GpuSampler) -> tuple[Measure, dict[str, np.ndarray]]:
    """The loop a user writes; its images, by id, are the reference for shardgen's."""
    start = time.time()
    pipe = _load(folder, device, dtype)
    if compiled:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, fullgraph=True)
        pipe.vae.decode = torch.compile(pipe.vae.decode)
    images: dict[str, np.ndarray] = {}
    ends: list[float] = []
    with torch.inference_mode():
        for lo in range(0, len(rows), w.batch_size):
            batch = rows[lo:lo + w.batch_size]
            out = pipe(prompt=[p for _, p in batch], negative_prompt=[""] * len(batch),
                       num_inference_steps=w.steps, guidance_scale=w.guidance_scale, width=w.width, height=w.height,
                       generator=[row_generator(derive_seed(i)) for i, _ in batch], output_type="np")
            images.update({i: to_uint8(img) for (i, _), img in zip(batch, out.images)})
            ends.append(time.time())
    system = "plain diffusers loop" + (", channels_last + torch.compile" if compiled else "")
    steady = (len(rows) - w.batch_size) / (ends[-1] - ends[0])
    measure = Measure(system, w.arch, len(rows), round(steady, 3), gpu_busy=sampler.busy(ends[0], ends[-1]),
                      first_image_s=round(ends[0] - start, 2), wall_s=round(time.time() - start, 2))
    return measure, images


def shardgen_job(folder: Path, w: Workload, rows: list[tuple[str, str]], work: Path, sampler: GpuSampler,
                 reference_images: dict[str, np.ndarray], system: str, choice: dict) -> Measure:
    """A whole job through shardgen on the same rows, with shardgen's defaults and ``choice``:
    manifest on disk, PNG shards out. A choice the model cannot take is refused: the row says why."""
    from PIL import Image

    from pipeline.errors import ModelError
    from pipeline.job import run_job
    from pipeline.spec import parse_spec

    manifest = work / f"{w.arch}-manifest.parquet"
    pq.write_table(pa.table({"id": [i for i, _ in rows], "prompt": [p for _, p in rows]}), manifest)
    spec = parse_spec({
        "manifest": str(manifest), "output": str(work / f"{w.arch}-dataset"),
        "stages": [{"kind": "text_to_image", "model": str(folder), "steps": w.steps,
                    "guidance_scale": w.guidance_scale, "width": w.width, "height": w.height, "actors": 1, **choice}],
    })
    start = time.time()
    try:
        stats = run_job(spec, overwrite=True, log=lambda _: None)
    except ModelError as err:
        return Measure(system, w.arch, 0, note=f"refused: {err}")
    wall = time.time() - start
    table = pq.read_table(Path(spec.output) / layout.DATA, columns=["id", "image", "created_at", "status", "error"])
    failed = table.filter(pa.compute.not_equal(table.column("status"), "ok"))
    if failed.num_rows:
        raise RuntimeError(f"{w.arch}: {failed.num_rows} shardgen rows failed, e.g. {failed.column('error')[0]}")
    times = sorted(t.timestamp() for t in table.column("created_at").to_pylist())
    later = [t for t in times if t > times[0]]
    psnrs = [psnr(np.asarray(Image.open(io.BytesIO(image["bytes"])).convert("RGB")), reference_images[i])
             for i, image in zip(table.column("id").to_pylist(), table.column("image").to_pylist())]
    [stage] = stats.stages
    return Measure(system, w.arch, table.num_rows,
                   round(len(later) / (times[-1] - times[0]), 3) if later else None,
                   gpu_busy=sampler.busy(times[0], times[-1]), first_image_s=round(times[0] - start, 2),
                   wall_s=round(wall, 2), min_psnr_db=min(psnrs),
                   note=f"batch {stage.batch_size}, fill {stage.fill:.0%}")


def measure(w: Workload, quick: bool, device: str, dtype: torch.dtype, tflops: float, work: Path,
            started: float, log=print) -> list[Measure]:
    folder = reference.build(w.arch, work / w.arch, tiny=quick, device=device, dtype=dtype)
    rows = [(f"{w.arch}-{k:05d}", p) for k, p in enumerate(sample_prompts(w.images))]
    flops = flops_per_image(_load(folder, device, dtype), w)
    results: list[Measure] = []
    # Compiling alone outlasts a quick run: there the choices that compile are only named.
    choices = [(n, c) for n, c in CHOICES if not (quick and c.get("compile"))]
    with GpuSampler() as sampler:
        for compiled in ([False] if quick else [False, True]):
            log(f"shardgen bench --gpu: {w.arch} plain loop{' compiled' if compiled else ''} ...")
            m, images = plain_loop(folder, w, rows, device, dtype, compiled, sampler)
            if not compiled:
                reference_images = images
            results.append(m)
        for system, choice in [("shardgen (defaults)", {}), *((f"shardgen, {n}", c) for n, c in choices)]:
            if time.time() - started > BUDGET_S:
                results.append(Measure(system, w.arch, 0, note=f"skipped: the run is past {BUDGET_S} s"))
                continue
            log(f"shardgen bench --gpu: {w.arch} {system} ...")
            results.append(shardgen_job(folder, w, rows, work, sampler, reference_images, system, choice))
        peak = sampler.peak_gb()
    if quick:
        results.insert(1, Measure("plain diffusers loop, channels_last + torch.compile", w.arch, 0,
                                  note="skipped in --quick"))
        results += [Measure(f"shardgen, {n}", w.arch, 0, note="skipped in --quick") for n, c in CHOICES
                    if c.get("compile")]
    base = results[0].images_per_s
    for m in results:
        if m.images_per_s:
            m.ratio_to_plain = round(m.images_per_s / base, 3)
            m.mfu = round(m.images_per_s * flops / (tflops * 1e12), 4)
        m.peak_memory_gb = peak if m.images_per_s else None
    return results


def run(quick: bool, json_path: str | None, log=print) -> Report:
    from pipeline.plan import ensure_ray

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # shardgen's `dtype: auto`
    report = Report(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", dtype=str(dtype),
                    peak_tflops=peak_tflops(device, dtype), quick=quick)
    ensure_ray()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for w in (QUICK if quick else FULL):
            report.workloads.append(asdict(w))
            report.results += measure(w, quick, device, dtype, report.peak_tflops, Path(tmp), started, log)
            if json_path:  # after each architecture, so a run cut short keeps what it measured
                Path(json_path).write_text(json.dumps(asdict(report), indent=2) + "\n")
    print_table(report)
    return report


CELLS = ("img/s", "ratio", "MFU", "GPU busy", "first image s", "peak GB", "min PSNR dB")


def _cells(m: Measure) -> list[str]:
    values = [m.images_per_s, m.ratio_to_plain, m.mfu, m.gpu_busy, m.first_image_s, m.peak_memory_gb, m.min_psnr_db]
    return ["-" if v is None else f"{v:g}" for v in values]


def markdown(report: Report) -> str:
    """The figures as the markdown table docs/performance.md holds."""
    lines = [f"| arch | system | {' | '.join(CELLS)} | note |", "|" + "---|" * (len(CELLS) + 3)]
    lines += [f"| {m.arch} | {m.system} | {' | '.join(_cells(m))} | {m.note} |" for m in report.results]
    return "\n".join(lines)


def print_table(report: Report) -> None:
    print(f"\n{report.device}, {report.dtype}, matmul peak {report.peak_tflops} TFLOP/s"
          + (" (--quick: tiny models, figures mean nothing)" if report.quick else ""))
    print(f"{'arch':<5} {'system':<52} {'img/s':>7} {'ratio':>6} {'MFU':>6} {'busy':>5} {'first s':>7} "
          f"{'peak GB':>7} {'PSNR':>6}  note")
    for m in report.results:
        text = _cells(m)
        print(f"{m.arch:<5} {m.system:<52} {text[0]:>7} {text[1]:>6} {text[2]:>6} {text[3]:>5} {text[4]:>7} "
              f"{text[5]:>7} {text[6]:>6}  {m.note}")
    print("\n" + markdown(report))
