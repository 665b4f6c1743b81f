"""What every diffusion stage shares: load the model family's pipeline for the stage's kind once
per actor, split a batch into calls the pipeline can take, one torch.Generator per row, prompt
embeddings shared along a chain between identical text encoders, and per-row errors.

A stage is a callable class that Ray Data runs on an actor pool; it knows diffusers and torch,
not Ray. It takes and returns batches as pyarrow tables. What differs between model families
(classes, prompt encoding, call arguments) is in pipeline/families.py; what differs between
kinds (the columns a stage reads, what it records) is in pipeline/kinds.py.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar

import diffusers
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
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from pipeline import columns
from pipeline.conditioning.stage import Conditioning
from pipeline.families import check_family, has_component
from pipeline.kinds import KINDS
from pipeline.models.resolve import cache_root, resolve
from pipeline.output_schema import FILTERED
from pipeline.spec import AUTO_MAX_BATCH, AUTO_START_BATCH, StageSpec, StorageSpec
from pipeline.stages import speed
from pipeline.stages.generators import row_generator
from pipeline.stages.metrics import ActorClock, ActorMetrics
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


def register_wuerstchen_module() -> None:
    """diffusers moved Würstchen (and the Paella VQ-GAN that Stable Cascade's decoder shares) to
    ``pipelines.deprecated``, yet the published checkpoints name the VQ-GAN's library "wuerstchen":
    under that name again, ``from_pretrained`` finds it (in every actor, not only where a test built
    the model) and ``save_pretrained`` writes the same entry."""
    import importlib.util

    if importlib.util.find_spec("diffusers.pipelines.deprecated.wuerstchen"):  # a diffusers that has moved it
        from diffusers.pipelines.deprecated import wuerstchen

        diffusers.pipelines.wuerstchen = wuerstchen


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A diffusers float image in [0, 1] to uint8, rounded as diffusers' own PIL conversion does."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _fingerprint(folder: Path, spec: StageSpec, encoder: str) -> str:
    """Identifies the prompt embeddings a stage makes: its text encoders and tokenizers byte for
    byte, the way its family encodes, and the settings that shape them."""
    digest = hashlib.sha256(f"{encoder}|{spec.max_sequence_length}|{bool(spec.true_cfg_scale)}".encode())
    for sub in sorted(p for p in folder.iterdir() if p.name.startswith(("text_encoder", "tokenizer"))):
        for f in sorted(sub.glob("*")):
            if f.is_file():
                digest.update(f"{sub.name}/{f.name}".encode())
                digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class Outcome:
    """One row's result of one pipeline call."""

    image: np.ndarray | None = None
    problem: str | None = None
    seconds: float = 0.0
    text: str | None = None  # its prompt embeddings: "computed", "reused", or "pipeline" (the pipeline encoded)
    embeds: bytes | None = None  # those embeddings, for the next stage
    flagged: str | None = None  # why the model's safety checker flagged the image (the row is `filtered`)


@dataclass
class Text:
    """One call's prompt arguments for the pipeline, and per row what to record and hand on."""

    args: dict
    source: str | None
    embeds: list[bytes | None]


class DiffusionStage:
    kind: ClassVar[str]

    def __init__(self, spec: StageSpec, storage: StorageSpec | None = None, position: int = 0,
                 keep_text_embeds: bool = False):
        self.spec = spec
        self.info = KINDS[self.kind]
        self.position = position
        self.keep_text_embeds = keep_text_embeds
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.clock = ActorClock(self.kind, self.device)
        if self.device == "cpu":
            # Ray starts actors with one torch thread; use the CPUs this actor reserved.
            torch.set_num_threads(max(1, int(spec.cpus_per_actor)))
        folder = resolve(spec.model, storage, spec.revision, spec.variant)
        index = json.loads((folder / "model_index.json").read_text())
        self.family = check_family(spec.model, index, spec)
        # LoRA adapters and ControlNets (pipeline/conditioning/): they may change the pipeline class.
        self.conditioning = Conditioning(spec, storage, position, self.family.name, index,
                                         self.family.pipelines[self.kind])
        self.pipeline_class = self.conditioning.pipeline_class
        self.dtype = self._dtype()
        # A shipped safety checker turns the images it flags black: off, it is not loaded and every
        # record says so; `filter` runs it and a flagged row is `filtered`, never a black ok image.
        self.safety_checker = has_component(index, "safety_checker")
        skipped = {"safety_checker": None} if self.safety_checker and spec.safety_checker == "off" else {}
        placed = {"device_map": "balanced"} if self.spreads else {}
        quantized = {"quantization_config": quantization(spec.quantize, index, self.device)} \
            if spec.quantize != "none" else {}
        register_wuerstchen_module()
        self.pipe: DiffusionPipeline = getattr(diffusers, self.pipeline_class).from_pretrained(
            folder, dtype=self.dtype, use_safetensors=True, local_files_only=True, **skipped, **placed, **quantized,
            **self.conditioning.components(self.dtype))
        self.conditioning.attach(self.pipe)
        self.offload = self._place()
        if spec.scheduler:
            self.pipe.scheduler = SCHEDULERS[spec.scheduler].from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler_name = type(self.pipe.scheduler).__name__
        # The arguments this pipeline class takes: which of the kind's parameters apply to it.
        self.takes = set(inspect.signature(self.pipe.__call__).parameters)
        self.text_encoder_id = _fingerprint(folder, spec, self.family.encode.__name__) if self.family.encode else None
        # On GPUs the kernels depend on the batch shape, and batching is the point; on CPUs
        # one row at a time makes every image independent of the batch it came in.
        self.batch_invariant = spec.batch_invariant if spec.batch_invariant is not None else self.device == "cpu"
        self.tuned = speed.tune(self.pipe) if self.device == "cuda" and self.offload == "none" else []
        self.tuned += speed.choose(self.pipe, spec)
        self.batch_size = self.clock.metrics.batch_size = self._batch_size()
        if spec.compile:
            self.tuned += speed.compile_pipeline(self.pipe, cache_root() / "inductor", spec.compile == "regional")
            self._warm_up()
        self.clock.loaded()

    @property
    def call_rows(self) -> int:
        """Rows per pipeline call when a group is full."""
        return 1 if self.batch_invariant else self.batch_size

    def _sample(self, n: int) -> tuple[dict[str, list], list[int]]:
        """``n`` made-up rows at the stage's own size and settings, for calls before the first batch."""
        batch = {"status": ["ok"] * n, "seed": [0] * n, "prompt": ["warm-up"] * n, "negative_prompt": [""] * n,
                 columns.TEXT_ENCODER: [None] * n,
                 **{name: [getattr(self.spec, name)] * n for name in self.info.overrides}}
        return batch, list(range(n))

    def _warm_up(self) -> None:
        """Compile now, with one call at the stage's own size and batch shape, so that the first
        real batch does not wait for it. Kinds that take an image compile on their first batch."""
        if not self.info.takes_image:
            self.generate(*self._sample(self.call_rows))

    def _batch_size(self) -> int:
        """The actor's batch size. `auto` on a GPU: the largest power of two up to AUTO_MAX_BATCH
        whose one-step call at the stage's size fits in memory (a call's peak does not grow with its
        steps); kinds that take an image have no input to probe with and start at AUTO_START_BATCH,
        as CPUs do (no device memory to find the limit of). Either way an out-of-memory call halves
        it later (run)."""
        if self.spec.batch_size != "auto":
            return self.spec.batch_size
        if self.device != "cuda" or self.info.takes_image:
            return AUTO_START_BATCH
        saved, self.spec = self.spec, self.spec.model_copy(update={"steps": 1})
        fits, n = 1, 1
        try:
            while n <= AUTO_MAX_BATCH:
                try:
                    self.generate(*self._sample(n))
                except OUT_OF_MEMORY:
                    break
                fits, n = n, 2 * n
        finally:
            self.spec = saved
            torch.cuda.empty_cache()
        self.clock.metrics.probed_batch_size = fits
        return fits

    def metrics(self) -> ActorMetrics:
        """This actor's figures so far (pipeline/stages/metrics.py)."""
        return self.clock.metrics

    def _dtype(self) -> torch.dtype:
        if self.spec.dtype != "auto":
            return getattr(torch, self.spec.dtype)
        if self.device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32

    @property
    def spreads(self) -> bool:
        """Whether one pipeline is placed across several GPUs (gpus_per_actor 2..8)."""
        return self.device == "cuda" and (self.spec.gpus_per_actor or 0) > 1

    def _place(self) -> str:
        """Put the pipeline on the device, or offload it (see StageSpec.offload); return what was done."""
        if self.spreads:  # from_pretrained placed it (device_map)
            return f"balanced over {self.spec.gpus_per_actor:g} GPUs"
        if self.device == "cpu" or self.spec.offload == "none":
            self.pipe.to(self.device)
            return "none"
        if self.spec.offload == "model":
            self.pipe.enable_model_cpu_offload(device=self.device)
        elif self.spec.offload == "group":
            self.pipe.enable_group_offload(onload_device=torch.device(self.device), offload_type="leaf_level",
                                           use_stream=True)
        else:
            self.pipe.enable_sequential_cpu_offload(device=self.device)
        return self.spec.offload

    # -- what each stage defines -------------------------------------------------------------

    def call_kwargs(self, batch: dict[str, list], rows: list[int]) -> dict:
        """The pipeline's arguments for ``rows`` that come from the kind (images, sizes, strength)."""
        raise NotImplementedError

    def finish(self, image: np.ndarray, batch: dict[str, list], i: int) -> np.ndarray:
        """Last touch on one row's float image in [0, 1]."""
        return image

    # -- shared --------------------------------------------------------------------------------

    def param(self, batch: dict[str, list], name: str, i: int):
        """The first stage of a chain honours the manifest's per-row overrides (filled in by the
        prepare step); later stages use their own spec values."""
        if self.position == 0 and name in self.info.overrides:
            return batch[name][i]
        return getattr(self.spec, name)

    def size(self, batch: dict[str, list], i: int) -> tuple[int, int]:
        """The (width, height) a row is generated at: its image's, or the stage's (or row's) size."""
        if self.info.takes_image:
            height, width = batch["pixels"][i].shape[:2]
            return width, height
        return self.param(batch, "width", i), self.param(batch, "height", i)

    @torch.inference_mode()
    def __call__(self, table: pa.Table) -> pa.Table:
        self.clock.batch_starts()
        batch = self.read(table)  # 1. the columns this kind reads
        outcomes: dict[int, Outcome] = {}
        for rows in self.group(batch):  # 2. the rows that may share one pipeline call
            outcomes.update(self.run(batch, rows))  # 3. generate
        out = self.write(table, batch, outcomes)  # 4. images, status, records, embeddings
        self.clock.batch_ends(len(outcomes))
        return out

    def read(self, table: pa.Table) -> dict[str, list]:
        """Step 1: the columns this stage declares, as lists (images as uint8 arrays under "pixels"
        and "mask"). A declared column that is missing is a bug upstream: refused, never None."""
        names = ["status", "seed"]
        if "prompt" in self.info.inputs:
            names += ["prompt", "negative_prompt"]
        if self.position == 0:
            names += list(self.info.overrides)
        if self.info.takes_image:
            names += ["height", "width", columns.PIXELS]
        if "mask" in self.info.inputs:
            names.append(columns.MASK)
        missing = [n for n in dict.fromkeys(names) if n not in table.column_names]
        if missing:
            raise KeyError(f"{self.kind}: the batch lacks the column(s) {missing} this stage reads")
        batch = {n: values(table, n) for n in names if n not in (columns.PIXELS, columns.MASK)}
        if self.info.takes_image:
            batch["pixels"] = raw_images(table)
        if "mask" in self.info.inputs:
            batch["mask"] = raw_images(table, columns.MASK, channels=1)
        # The manifest's reference_images (PNG bytes), which only a first image_to_image stage takes.
        takes_references = self.kind == "image_to_image" and self.position == 0
        batch["references"] = values(table, columns.REFERENCES) if takes_references else [None] * table.num_rows
        batch |= self.conditioning.read(table)
        if self.text_encoder_id:  # only after a stage that kept its embeddings
            batch[columns.TEXT_ENCODER] = values(table, columns.TEXT_ENCODER)
            batch[columns.TEXT_EMBEDS] = values(table, columns.TEXT_EMBEDS)
        return batch

    def group(self, batch: dict[str, list]) -> list[list[int]]:
        """Step 2: the ok rows grouped by what one pipeline call must share (its per-row parameters
        and the input size), each group cut into calls of the actor's batch size, so that only a
        group's last call can be short. Rows with and without a negative prompt share calls: the
        families encode a missing one as a plain diffusers call does (pipeline/families.py)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, status in enumerate(batch["status"]):
            if status == "ok":
                key = tuple(self.param(batch, name, i) for name in self.info.overrides)
                key += self.conditioning.group_key(batch, i)
                if self.info.takes_image:
                    key += (batch["pixels"][i].shape,)
                if batch["references"][i]:  # its images are the whole call's
                    key += (i,)
                groups[key].append(i)
        n = self.call_rows
        return [rows[lo:lo + n] for rows in groups.values() for lo in range(0, len(rows), n)]

    def run(self, batch: dict[str, list], rows: list[int]) -> Iterator[tuple[int, Outcome]]:
        """Step 3: pipeline calls for ``rows``, none over the actor's batch size. A call that runs
        out of memory halves the batch size for the rest of the job and its rows go again at the
        new size; a call of several rows that fails otherwise is retried row by row, so that one bad
        row cannot fail its neighbours."""
        while len(rows) > self.call_rows:  # the batch size was halved since the rows were grouped
            head, rows = rows[:self.call_rows], rows[self.call_rows:]
            yield from self.run(batch, head)
        start = time.perf_counter()
        try:
            (images, text, flags), problem, out_of_memory = self.generate(batch, rows), None, False
        except Exception as err:  # noqa: BLE001 - every failure becomes the row's error message
            images, problem, out_of_memory = None, _problem(self.kind, err), isinstance(err, OUT_OF_MEMORY)
        self.clock.pipeline_ran(time.perf_counter() - start, len(rows), self.call_rows)
        # Retried outside the except block: the exception's traceback holds the failed call's
        # tensors, which an out-of-memory retry needs freed first.
        if images is None:
            if self.device == "cuda":
                torch.cuda.empty_cache()
            if len(rows) > 1 and out_of_memory:
                self._halve(len(rows))
                yield from self.run(batch, rows)
            elif len(rows) > 1:
                for i in rows:
                    yield from self.run(batch, [i])
            else:
                yield rows[0], Outcome(problem=problem, seconds=time.perf_counter() - start)
            return
        seconds = (time.perf_counter() - start) / len(rows)
        for i, image, embeds, flagged in zip(rows, images, text.embeds, flags):
            if flagged:  # its image is black: none is kept
                yield i, Outcome(seconds=seconds, text=text.source, flagged=flagged)
            elif image is None:
                yield i, Outcome(problem=f"{self.kind}: output is not finite (NaN or inf)", seconds=seconds)
            else:
                yield i, Outcome(image, None, seconds, text.source, embeds)

    def _halve(self, rows: int) -> None:
        """A call of ``rows`` rows ran out of memory: at most half as many per call from now on,
        said once, as the job's log shows an actor's standard error."""
        self.batch_size = max(1, min(self.batch_size, rows // 2))
        self.clock.metrics.batch_size = self.batch_size
        self.clock.metrics.batch_halvings += 1
        print(f"shardgen: {self.kind}: a call of {rows} rows ran out of memory; this actor's batch size is "
              f"{self.batch_size} for the rest of the job", file=sys.stderr, flush=True)

    def generate(self, batch: dict[str, list], rows: list[int]) -> tuple[list[np.ndarray | None], Text,
                                                                          list[str | None]]:
        """Run the pipeline on one call's ``rows``: one uint8 HxWx3 image per row (None where the
        output is not finite), how their prompts were encoded, and per row why the safety checker
        flagged it (None: not flagged, or not run)."""
        i = rows[0]
        # Compiled, every call keeps the batch's shape (a new shape would compile again): a short
        # group is padded with copies of its last row, whose images are dropped.
        calls = rows + [rows[-1]] * (self.call_rows - len(rows)) if self.spec.compile else rows
        text = self.text(batch, calls)
        kwargs = {**text.args, **self.call_kwargs(batch, calls), "num_inference_steps": self.param(batch, "steps", i),
                  "output_type": self.family.output_type,
                  "generator": [row_generator(batch["seed"][r], self.position) for r in calls]}
        if "guidance_scale" in self.info.params:
            kwargs["guidance_scale"] = self.param(batch, "guidance_scale", i)
        kwargs = self.taken(kwargs) | self.family.call_args(self.pipe, self.spec, *self.size(batch, i)) \
            | self.conditioning.call_args(self.takes, batch, calls, *self.size(batch, i))
        output = self.pipe(**kwargs)
        images = self.to_images(output.images[:len(rows)], batch, rows)
        self.check_size(images, batch, i)
        return images, replace(text, embeds=text.embeds[:len(rows)]), self.flags(output)[:len(rows)]

    def flags(self, output) -> list[str | None]:
        """Per image of a pipeline's ``output``, why its safety checker flagged it, or None. With
        `safety_checker: filter` a pipeline must say which images it flagged (SD's
        nsfw_content_detected, DeepFloyd IF's nsfw_detected): one that does not fails its rows
        rather than pass black images as ok."""
        if self.spec.safety_checker == "off":
            return [None] * len(output.images)
        found = next((getattr(output, n) for n in SAFETY_FLAGS if getattr(output, n, None) is not None), None)
        if found is None:
            raise ValueError(f"safety_checker: filter: {self.pipeline_class} does not report which images its "
                             "safety checker flagged")
        checker = type(self.pipe.safety_checker).__name__
        return [f"safety_checker: {checker} flagged the image as not safe for work" if f else None for f in found]

    def taken(self, kwargs: dict) -> dict:
        """The standard arguments under the names this pipeline takes them by, and only those it
        takes; resolution binning and caption cleaning off (the asked size must come back, and a
        prompt is used as written)."""
        kwargs = {**kwargs, "use_resolution_binning": False, "clean_caption": False}
        for name, names in self.family.renames.items():
            if name in kwargs:
                value = kwargs.pop(name)
                kwargs |= {n: value for n in names}
        return {name: value for name, value in kwargs.items() if name in self.takes}

    def check_size(self, images: list[np.ndarray | None], batch: dict[str, list], i: int) -> None:
        """Refuse images not of the size the row asked for (the input's times the family's scale for
        kinds that take an image), where a pipeline rounded or binned the size on its own."""
        if self.info.size_from == "model":
            return
        width, height = self.size(batch, i)
        if self.info.takes_image:
            width, height = width * self.family.scale, height * self.family.scale
        made = next((im.shape[:2] for im in images if im is not None), (height, width))
        if made != (height, width):
            raise ValueError(f"{self.pipeline_class} made {made[1]}x{made[0]} images where {width}x{height} was "
                             f"asked; {self.family.title} sizes are multiples of {self.family.multiple}")

    def to_images(self, images, batch: dict[str, list], rows: list[int]) -> list[np.ndarray | None]:
        """The pipeline's images (a float NCHW tensor in [0, 1] on the device; numpy NHWC from the
        pipelines without tensor output) as uint8 arrays, None where not finite. Rounded as diffusers'
        own conversion does, on the device, so that a quarter of the bytes cross to the host; a kind
        with a finishing touch (inpainting keeps the unmasked pixels) finishes the float image first."""
        if not isinstance(images, torch.Tensor):
            images = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
        images = images.float()
        finite = torch.isfinite(images).flatten(1).all(1).tolist()
        if type(self).finish is DiffusionStage.finish:
            pixels = images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            return [p if ok else None for p, ok in zip(pixels, finite)]
        floats = images.permute(0, 2, 3, 1).cpu().numpy()
        return [to_uint8(self.finish(f, batch, r)) if ok else None for f, r, ok in zip(floats, rows, finite)]

    def text(self, batch: dict[str, list], rows: list[int]) -> Text:
        """The prompt arguments for ``rows``: the previous stage's embeddings where it had the same
        text encoders, else embeddings computed here; prompts as text for families whose pipeline
        encodes them itself."""
        none = [None] * len(rows)
        if "prompt" not in self.info.inputs:
            return Text({}, None, none)
        prompts = [batch["prompt"][i] for i in rows]
        negatives = [batch["negative_prompt"][i] for i in rows]
        if self.family.encode is None:
            return Text({"prompt": prompts, "negative_prompt": negatives}, "pipeline", none)
        embeds, source = self._reused(batch, rows), "reused"
        if embeds is None:
            embeds, source = self.family.encode(self.pipe, prompts, negatives, self.device, self.spec), "computed"
        embeds = {name: tensor for name, tensor in embeds.items() if name in self.takes}
        kept = [save_tensors({name: t[k].float().cpu().contiguous() for name, t in embeds.items()})
                for k in range(len(rows))] if self.keep_text_embeds else none
        return Text(embeds, source, kept)

    def _reused(self, batch: dict[str, list], rows: list[int]) -> dict | None:
        if self.text_encoder_id is None or any(batch[columns.TEXT_ENCODER][i] != self.text_encoder_id for i in rows):
            return None
        unpacked = [load_tensors(batch[columns.TEXT_EMBEDS][i]) for i in rows]
        return {name: torch.stack([u[name] for u in unpacked]).to(self.device, self.dtype) for name in unpacked[0]}

    def record(self, batch: dict[str, list], i: int, width: int, height: int, outcome: Outcome) -> dict:
        """What this stage did to row ``i``, for the row's stage_params."""
        params = {p: self.param(batch, p, i) for p in self.info.params if p == "steps" or p in self.takes}
        record = {"kind": self.kind, "model": self.spec.model, "family": self.family.name,
                  "pipeline": self.pipeline_class, "scheduler": self.scheduler_name, **params,
                  "guidance": self.family.guidance(self.pipe), "width": width, "height": height}
        if "prompt" in self.info.inputs:
            record["text_embeds"] = outcome.text
        if self.offload != "none":
            record["offload"] = self.offload
        if self.safety_checker:
            record["safety_checker"] = "passed" if self.spec.safety_checker == "filter" else "not run"
        if self.spec.quantize != "none":
            record["quantize"] = self.spec.quantize
        record |= self.conditioning.record(batch, i)
        return record | self.family.call_args(self.pipe, self.spec, *self.size(batch, i))

    def write(self, table: pa.Table, batch: dict[str, list], outcomes: dict[int, Outcome]) -> pa.Table:
        """Step 4: the rows' images, status, timings, records and the embeddings for the next stage."""
        n = table.num_rows
        done = {i: o for i, o in outcomes.items() if o.problem is None and o.flagged is None}
        failed = {i: o.problem for i, o in outcomes.items() if o.problem is not None}
        flagged = {i: o.flagged for i, o in outcomes.items() if o.flagged is not None}
        status = ["error" if i in failed else FILTERED if i in flagged else s
                  for i, s in enumerate(values(table, "status"))]
        error = [failed.get(i, flagged.get(i, e)) for i, e in enumerate(values(table, "error"))]
        elapsed = [outcomes[i].seconds if i in outcomes else 0.0 for i in range(n)]
        table = with_pixels(table, [done[i].image if i in done else None for i in range(n)])
        widths, heights = values(table, "width"), values(table, "height")
        records = [json.dumps([*json.loads(p), self.record(batch, i, widths[i], heights[i], done[i])]) if i in done
                   else p for i, p in enumerate(values(table, columns.STAGE_PARAMS))]
        embeds = [done[i].embeds if i in done else None for i in range(n)]
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        updates = [
            # When the row's image was made: the last stage's time wins.
            ("created_at", [now if i in outcomes else c for i, c in enumerate(values(table, "created_at"))],
             pa.timestamp("us")),
            ("status", status, pa.string()),
            ("error", error, pa.string()),
            ("elapsed_s", [a + b for a, b in zip(values(table, "elapsed_s"), elapsed)], pa.float64()),
            (columns.ELAPSED_PREFIX + self.kind, elapsed, pa.float64()),
            (columns.STAGES, [(f"{s},{self.kind}" if s else self.kind) if i in outcomes else s
                              for i, s in enumerate(values(table, columns.STAGES))], pa.string()),
            (columns.STAGE_PARAMS, records, pa.string()),
            (columns.TEXT_EMBEDS, embeds, pa.binary()),
            (columns.TEXT_ENCODER, [self.text_encoder_id if e is not None else None for e in embeds], pa.string()),
        ]
        if self.position == 0:  # The row's headline model and scheduler are those of the stage that made the image.
            updates += [("model", [self.spec.model] * n, pa.string()),
                        ("scheduler", [self.scheduler_name] * n, pa.string())]
        for name, vals, type_ in updates:
            table = with_column(table, name, vals, type_)
        return table


# The pipeline output fields that say which images a safety checker flagged.
SAFETY_FLAGS = ("nsfw_content_detected", "nsfw_detected")

# What running out of memory raises: on a GPU, torch's error; on a CPU, Python's.
OUT_OF_MEMORY = (torch.cuda.OutOfMemoryError, MemoryError)


# The components a `quantize:` setting applies to: the denoiser and the text encoders, where the
# weights are (the VAE is small and quantizes badly).
QUANTIZED_PREFIXES = ("transformer", "unet", "prior", "decoder", "text_encoder")


def quantization(name: str, index: dict, device: str):
    """diffusers' PipelineQuantizationConfig for a StageSpec.quantize setting and a model's
    components (each through its own library's config class); ModelError where this machine
    cannot run it."""
    import transformers
    from diffusers import PipelineQuantizationConfig

    from pipeline.errors import ModelError

    if name != "int8_weight_only" and device != "cuda":
        raise ModelError(f"quantize: {name} runs on GPUs only; int8_weight_only runs on CPUs too")
    if name == "nf4":
        kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16}
        configs = {lib: lib.BitsAndBytesConfig for lib in (diffusers, transformers)}
    else:
        try:
            from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig
        except ImportError:
            raise ModelError(f"quantize: {name} needs torchao (pip install 'shardgen[quantize]')") from None
        kwargs = {"quant_type": Int8WeightOnlyConfig() if name == "int8_weight_only" else Float8WeightOnlyConfig()}
        configs = {lib: lib.TorchAoConfig for lib in (diffusers, transformers)}
    libraries = {"diffusers": diffusers, "transformers": transformers}
    mapping = {component: configs[libraries[index[component][0]]](**kwargs) for component in index
               if component.startswith(QUANTIZED_PREFIXES) and has_component(index, component)
               and index[component][0] in libraries}
    return PipelineQuantizationConfig(quant_mapping=mapping)


def _problem(kind: str, err: Exception) -> str:
    """A failed row's error message: the stage, the exception's type, its text."""
    message = f"{kind}: {type(err).__name__}: {err}"
    if isinstance(err, OUT_OF_MEMORY):
        message += " (out of memory for this row alone: lower its width, height or steps, or the job's limits)"
    return message


def to_pil(images: list[np.ndarray], rows: list[int]) -> list[Image.Image]:
    """The rows' uint8 arrays as PIL images (HxWx3: RGB, HxW: a mask in mode L)."""
    return [Image.fromarray(images[i]) for i in rows]
