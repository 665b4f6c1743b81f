"""What every diffusion stage shares: load the pipeline once per actor, split a batch into calls
the pipeline can take, one torch.Generator per row, and per-row errors.

A stage is a callable class that Ray Data runs on an actor pool; it knows diffusers and torch,
not Ray. It takes and returns batches as pyarrow tables.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from pipeline.models.resolve import resolve
from pipeline import columns
from pipeline.spec import StageSpec, StorageSpec
from pipeline.tables import pixels, values, with_column, with_pixels

SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}

def to_uint8(image: np.ndarray) -> np.ndarray:
    """A diffusers float image in [0, 1] to uint8, rounded as diffusers' own PIL conversion does."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def row_generator(seed: int) -> torch.Generator:
    # A CPU generator per row: the noise of a row depends on its seed alone, on any device.
    return torch.Generator("cpu").manual_seed(int(seed))


class DiffusionStage:
    kind: ClassVar[str]

    def __init__(self, spec: StageSpec, storage: StorageSpec | None = None):
        self.spec = spec
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            # Ray starts actors with one torch thread; use the CPUs this actor reserved.
            torch.set_num_threads(max(1, int(spec.cpus_per_actor)))
        self.pipe = self.load(resolve(spec.model, storage), self._dtype()).to(self.device)
        if spec.scheduler:
            self.pipe.scheduler = SCHEDULERS[spec.scheduler].from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler_name = type(self.pipe.scheduler).__name__
        # On GPUs the kernels depend on the batch shape, and batching is the point; on CPUs
        # one row at a time makes every image independent of the batch it came in.
        self.batch_invariant = spec.batch_invariant if spec.batch_invariant is not None else self.device == "cpu"

    def _dtype(self) -> torch.dtype:
        if self.spec.dtype != "auto":
            return getattr(torch, self.spec.dtype)
        if self.device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32

    # -- what each stage defines -------------------------------------------------------------

    # The row columns generate() reads, as Python lists in ``batch``; "pixels" adds the rows'
    # current images (decoded from the previous step) as uint8 arrays.
    inputs: ClassVar[tuple[str, ...]] = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height")

    def load(self, path, dtype: torch.dtype) -> DiffusionPipeline:
        raise NotImplementedError

    def group_key(self, batch: dict[str, list], i: int) -> tuple:
        """Rows with equal keys can share one pipeline call."""
        raise NotImplementedError

    def generate(self, batch: dict[str, list], rows: list[int]) -> list[np.ndarray]:
        """Run the pipeline on ``rows`` (one group): one float HxWx3 array in [0, 1] per row."""
        raise NotImplementedError

    # -- shared batch handling ---------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        status = values(table, "status")
        error = values(table, "error")
        batch = {name: values(table, name) for name in self.inputs if name != "pixels"}
        if "pixels" in self.inputs:
            batch["pixels"] = pixels(table)
        images: list[np.ndarray | None] = [None] * n
        elapsed = [0.0] * n
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in range(n):
            if status[i] == "ok":
                groups[self.group_key(batch, i)].append(i)
        for rows in groups.values():
            calls = [[i] for i in rows] if self.batch_invariant else [rows]
            for call in calls:
                for i, image, problem, seconds in self._run(batch, call):
                    elapsed[i] += seconds
                    if problem is None:
                        images[i] = image
                    else:
                        status[i], error[i] = "error", problem
        table = with_pixels(table, images)
        for name, vals, type_ in [
            ("status", status, pa.string()),
            ("error", error, pa.string()),
            ("elapsed_s", [a + b for a, b in zip(values(table, "elapsed_s"), elapsed)], pa.float64()),
            (columns.ELAPSED_PREFIX + self.kind, elapsed, pa.float64()),
            ("model", [self.spec.model] * n, pa.string()),
            ("scheduler", [self.scheduler_name] * n, pa.string()),
            (columns.STAGES, [f"{s},{self.kind}" if s else self.kind for s in values(table, columns.STAGES)], pa.string()),
        ]:
            table = with_column(table, name, vals, type_)
        return table

    def _run(self, batch, rows: list[int]):
        """Yield (row, image, problem, seconds) for one pipeline call; when a call with several rows
        fails, each row is retried alone so that one bad row cannot fail its neighbours."""
        start = time.perf_counter()
        try:
            images = self.generate(batch, rows)
        except Exception as err:  # noqa: BLE001 - every failure becomes the row's error message
            if len(rows) > 1:
                for i in rows:
                    yield from self._run(batch, [i])
                return
            yield rows[0], None, f"{self.kind}: {type(err).__name__}: {err}", time.perf_counter() - start
            return
        seconds = (time.perf_counter() - start) / len(rows)
        for i, image in zip(rows, images):
            if not np.isfinite(image).all():
                yield i, None, f"{self.kind}: output is not finite", seconds
            else:
                yield i, to_uint8(image), None, seconds
