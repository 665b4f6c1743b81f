"""What every diffusion stage shares: load the pipeline once per actor, split a batch into calls
the pipeline can take, one torch.Generator per row, prompt embeddings shared along a chain, and
per-row errors.

A stage is a callable class that Ray Data runs on an actor pool; it knows diffusers and torch,
not Ray. It takes and returns batches as pyarrow tables.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
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
from PIL import Image

from pipeline import columns
from pipeline.models.resolve import resolve
from pipeline.spec import StageSpec, StorageSpec
from pipeline.tables import raw_images, values, with_column, with_pixels

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


def row_generator(seed: int, position: int = 0) -> torch.Generator:
    """A CPU generator per row and stage: a row's noise depends on its seed and the stage's place
    in the chain alone, on any device and in any batch."""
    mixed = (int(seed) + position * 0x9E3779B97F4A7C15) % (1 << 63)
    return torch.Generator("cpu").manual_seed(mixed)


def _fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for sub in ("text_encoder", "tokenizer"):
        for f in sorted((folder / sub).glob("*")):
            if f.is_file():
                digest.update(f.name.encode())
                digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


class DiffusionStage:
    kind: ClassVar[str]
    # The row columns generate() reads, as Python lists in ``batch``. "pixels" adds the rows'
    # current images and "mask" their masks, as uint8 arrays.
    inputs: ClassVar[tuple[str, ...]] = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale")
    # The spec fields this stage's record lists (besides kind, model and scheduler).
    params: ClassVar[tuple[str, ...]] = ("steps", "guidance_scale")

    def __init__(self, spec: StageSpec, storage: StorageSpec | None = None, position: int = 0,
                 keep_text_embeds: bool = False):
        self.spec = spec
        self.position = position
        self.keep_text_embeds = keep_text_embeds
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            # Ray starts actors with one torch thread; use the CPUs this actor reserved.
            torch.set_num_threads(max(1, int(spec.cpus_per_actor)))
        folder = resolve(spec.model, storage, spec.revision, spec.variant)
        self.pipe = self.load(folder, self._dtype()).to(self.device)
        if spec.scheduler:
            self.pipe.scheduler = SCHEDULERS[spec.scheduler].from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler_name = type(self.pipe.scheduler).__name__
        self.text_encoder_id = _fingerprint(folder)
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

    def load(self, path: Path, dtype: torch.dtype) -> DiffusionPipeline:
        raise NotImplementedError

    def call_kwargs(self, batch: dict[str, list], rows: list[int]) -> dict:
        """The pipeline's arguments for ``rows`` beyond prompts, steps, guidance and generators."""
        raise NotImplementedError

    def group_extra(self, batch: dict[str, list], i: int) -> tuple:
        """What else, besides steps and guidance, rows must share to go in one pipeline call."""
        return ()

    def finish(self, image: np.ndarray, batch: dict[str, list], i: int) -> np.ndarray:
        """Last touch on one row's float image in [0, 1]."""
        return image

    # -- shared --------------------------------------------------------------------------------

    def param(self, batch: dict[str, list], name: str, i: int):
        """The first stage of a chain honours the manifest's per-row overrides (filled in by the
        prepare step); later stages use their own spec values."""
        if self.position == 0 and name in batch:
            return batch[name][i]
        return getattr(self.spec, name)

    def record(self, batch: dict[str, list], i: int, width: int, height: int) -> dict:
        return {"kind": self.kind, "model": self.spec.model, "scheduler": self.scheduler_name,
                **{p: self.param(batch, p, i) for p in self.params}, "width": width, "height": height,
                "text_embeds": self.text_source.get(i)}

    def text_kwargs(self, batch: dict[str, list], rows: list[int]) -> dict:
        """Prompt embeddings for ``rows``: the previous stage's where it used the same text encoder,
        else computed here."""
        if all(batch[columns.TEXT_ENCODER][i] == self.text_encoder_id for i in rows):
            dim = self.pipe.text_encoder.config.hidden_size
            stacked = np.stack([np.frombuffer(batch[columns.TEXT_EMBEDS][i], np.float32).reshape(2, -1, dim)
                                for i in rows])
            embeds = torch.from_numpy(stacked).to(self.device, self.pipe.text_encoder.dtype)
            negative, positive = embeds[:, 0], embeds[:, 1]
            source = "reused"
        else:
            source = "computed"
            positive, negative = self.pipe.encode_prompt(
                [batch["prompt"][i] for i in rows], self.device, 1, True, [batch["negative_prompt"][i] for i in rows]
            )
        for k, i in enumerate(rows):
            self.text_source[i] = source
            if self.keep_text_embeds:
                self.text_embeds[i] = torch.stack([negative[k], positive[k]]).float().cpu().numpy().tobytes()
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative}

    def generate(self, batch: dict[str, list], rows: list[int]) -> list[np.ndarray]:
        """Run the pipeline on ``rows`` (one group): one float HxWx3 array in [0, 1] per row."""
        i = rows[0]
        out = self.pipe(
            **self.text_kwargs(batch, rows),
            num_inference_steps=self.param(batch, "steps", i),
            guidance_scale=self.param(batch, "guidance_scale", i),
            generator=[row_generator(batch["seed"][r], self.position) for r in rows],
            output_type="np",
            **self.call_kwargs(batch, rows),
        )
        return [self.finish(image, batch, r) for image, r in zip(np.asarray(out.images), rows)]

    @torch.inference_mode()
    def __call__(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        status, error = values(table, "status"), values(table, "error")
        batch = {name: values(table, name) for name in (*self.inputs, columns.TEXT_ENCODER, columns.TEXT_EMBEDS)
                 if name not in ("pixels", "mask")}
        if "pixels" in self.inputs:
            batch["pixels"] = raw_images(table)
        if "mask" in self.inputs:
            batch["mask"] = raw_images(table, columns.MASK, channels=1)
        # Per row of this batch: the prompt embeddings to pass on, and whether they were reused.
        self.text_embeds: dict[int, bytes] = {}
        self.text_source: dict[int, str] = {}
        images: list[np.ndarray | None] = [None] * n
        elapsed = [0.0] * n
        attempted = [s == "ok" for s in status]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in range(n):
            if attempted[i]:
                key = (self.param(batch, "steps", i), self.param(batch, "guidance_scale", i), *self.group_extra(batch, i))
                groups[key].append(i)
        for rows in groups.values():
            for call in ([[i] for i in rows] if self.batch_invariant else [rows]):
                for i, image, problem, seconds in self._run(batch, call):
                    elapsed[i] += seconds
                    if problem is None:
                        images[i] = image
                    else:
                        status[i], error[i] = "error", problem
        table = with_pixels(table, images)
        records = [
            json.dumps([*json.loads(p), self.record(batch, i, w, h)]) if s == "ok" else p
            for i, (p, s, w, h) in enumerate(
                zip(values(table, columns.STAGE_PARAMS), status, values(table, "width"), values(table, "height")))
        ]
        first = self.position == 0
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        updates = [
            # When the row's image was made: the last stage's time wins.
            ("created_at", [now if a else c for a, c in zip(attempted, values(table, "created_at"))],
             pa.timestamp("us")),
            ("status", status, pa.string()),
            ("error", error, pa.string()),
            ("elapsed_s", [a + b for a, b in zip(values(table, "elapsed_s"), elapsed)], pa.float64()),
            (columns.ELAPSED_PREFIX + self.kind, elapsed, pa.float64()),
            (columns.STAGES, [(f"{s},{self.kind}" if s else self.kind) if a else s
                              for s, a in zip(values(table, columns.STAGES), attempted)], pa.string()),
            (columns.STAGE_PARAMS, records, pa.string()),
            (columns.TEXT_EMBEDS, [self.text_embeds.get(i) for i in range(n)], pa.binary()),
            (columns.TEXT_ENCODER, [self.text_encoder_id if i in self.text_embeds else None for i in range(n)],
             pa.string()),
        ]
        if first:  # The row's headline model and scheduler are those of the stage that made the image.
            updates += [("model", [self.spec.model] * n, pa.string()), ("scheduler", [self.scheduler_name] * n, pa.string())]
        for name, vals, type_ in updates:
            table = with_column(table, name, vals, type_)
        return table

    def _run(self, batch, rows: list[int]):
        """Yield (row, image, problem, seconds) for one pipeline call; when a call with several rows
        fails, each row is retried alone so that one bad row cannot fail its neighbours."""
        start = time.perf_counter()
        try:
            images, problem = self.generate(batch, rows), None
        except Exception as err:  # noqa: BLE001 - every failure becomes the row's error message
            images, problem = None, _problem(self.kind, err)
        # Retried outside the except block: the exception's traceback holds the failed call's
        # tensors, which an out-of-memory retry needs freed first.
        if images is None:
            if self.device == "cuda":
                torch.cuda.empty_cache()
            if len(rows) > 1:
                for i in rows:
                    yield from self._run(batch, [i])
                return
            yield rows[0], None, problem, time.perf_counter() - start
            return
        seconds = (time.perf_counter() - start) / len(rows)
        for i, image in zip(rows, images):
            if not np.isfinite(image).all():
                yield i, None, f"{self.kind}: output is not finite (NaN or inf)", seconds
            else:
                yield i, to_uint8(image), None, seconds


def _problem(kind: str, err: Exception) -> str:
    """A failed row's error message: the stage, the exception's type, its text."""
    message = f"{kind}: {type(err).__name__}: {err}"
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        message += " (out of memory for this row alone: lower its width, height or steps, or the job's limits)"
    return message


def to_pil(images: list[np.ndarray], rows: list[int]) -> list[Image.Image]:
    """The rows' uint8 arrays as PIL images (HxWx3: RGB, HxW: a mask in mode L)."""
    return [Image.fromarray(images[i]) for i in rows]
