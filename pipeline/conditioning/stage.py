"""A stage's conditioning, as the stage uses it: at load time the pipeline class and the ControlNet
or T2I-Adapter models it is built with, then the IP-Adapter and LoRA adapters put into it; at call
time the columns it reads, what rows must share to share a call, the pipeline arguments, and what
each row's record says."""

from __future__ import annotations

import pyarrow as pa
from PIL import Image

from pipeline import columns
from pipeline.conditioning import control_images, controlnet, ip_adapter, lora
from pipeline.spec import StageSpec, StorageSpec
from pipeline.tables import values


class Conditioning:
    def __init__(self, spec: StageSpec, storage: StorageSpec | None, position: int, family: str, model_index: dict,
                 plain_class: str):
        self.spec = spec
        self.storage = storage
        self.position = position
        self.family = family
        self.pipeline_class = controlnet.pipeline_class(family, spec, model_index, plain_class, storage)
        # FLUX.1 Control reads the control image in its transformer, with no ControlNet.
        self.model_control = self.pipeline_class in controlnet.MODEL_CONTROL
        self.controlled = self.pipeline_class != plain_class or self.model_control
        self.adapters: lora.Adapters | None = None

    def components(self, dtype) -> dict:
        """Load time, step 1: from_pretrained's extra arguments (the stage's ControlNets)."""
        return controlnet.load(self.spec, self.storage, dtype)

    def attach(self, pipe) -> None:
        """Load time, step 2: the IP-Adapter, then the LoRA adapters, fused where the stage has one
        fixed set."""
        if self.spec.ip_adapter:
            ip_adapter.attach(pipe, self.spec, self.storage, self.family)
        self.adapters = lora.Adapters(pipe, self.spec, self.storage) if self.spec.loras else None

    @property
    def controls(self) -> int:
        return max(self.spec.control_models, 1) if self.controlled else 0

    def read(self, table: pa.Table) -> dict[str, list]:
        """The conditioning columns as lists; absent ones read as unset (the stage's own values)."""
        batch = {control_images.internal(k): values(table, control_images.internal(k))
                 for k in range(self.controls)}
        if self.spec.ip_adapter:
            batch[columns.REFERENCE_IMAGE] = values(table, columns.REFERENCE_IMAGE)
        named = lora.JOIN.join(lora.selectable(self.spec))
        batch[columns.LORA] = values(table, columns.LORA, named) if self.position == 0 else [named] * table.num_rows
        if self.controlled:
            scales = values(table, "controlnet_scale") if self.position == 0 else [None] * table.num_rows
            batch["controlnet_scale"] = [self.spec.controlnet_scale if s is None else s for s in scales]
        return batch

    def group_key(self, batch: dict[str, list], i: int) -> tuple:
        """What rows must share to share a call: their adapter set, ControlNet scale and reference
        image (diffusers gives every row of a call the call's reference images), and with several
        ControlNets on some pipelines their control images (controlnet.shares_controls)."""
        shared = tuple(batch[control_images.internal(k)][i] for k in range(self.controls)) \
            if controlnet.shares_controls(self.pipeline_class, self.spec) else ()
        return (batch[columns.LORA][i], batch["controlnet_scale"][i] if self.controlled else None,
                batch[columns.REFERENCE_IMAGE][i] if self.spec.ip_adapter else None, *shared)

    def call_args(self, pipe_takes: set[str], batch: dict[str, list], rows: list[int], width: int,
                  height: int) -> dict:
        """Call time: switch to the rows' adapters; the control and reference images as pipeline
        arguments."""
        if self.adapters:
            self.adapters.use(batch[columns.LORA][rows[0]])
        args = self.reference_args(batch, rows[0]) if self.spec.ip_adapter else {}
        if not self.controlled:
            return args
        images = []
        for k in range(self.controls):
            name = control_images.column(k)
            per_row = []
            for i in rows:
                data = batch[control_images.internal(k)][i]
                if data is None:
                    raise ValueError(f"{name}: missing (this stage's {self.pipeline_class} takes a control image)")
                image = control_images.unpack(data)
                if image.size != (width, height):
                    raise ValueError(f"{name}: size {image.width}x{image.height} differs from the {width}x{height} "
                                     "image this stage makes")
                per_row.append(image)
            images.append(per_row)
        if self.model_control:
            return args | {"control_image": images[0]}
        if self.pipeline_class in controlnet.GLOBAL_RNG:
            self.seed_global_generator(batch["seed"][rows[0]])
        masks = [Image.fromarray(batch["mask"][i]) for i in rows] if "mask" in batch else None
        return args | controlnet.call_args(self.pipeline_class, pipe_takes, self.spec, images,
                                           batch["controlnet_scale"][rows[0]], masks)

    def seed_global_generator(self, seed: int) -> None:
        """Seed torch's global generator from the call's first row, for a pipeline that draws the
        control image's VAE latents from it: a row alone in its call (CPUs) is then reproducible;
        in a batch, the draw is its call's first row's."""
        import torch

        from pipeline.stages.generators import row_generator

        torch.manual_seed(row_generator(seed, self.position).initial_seed())

    def reference_args(self, batch: dict[str, list], i: int) -> dict:
        """The call's reference image: its rows share one (group_key)."""
        data = batch[columns.REFERENCE_IMAGE][i]
        if data is None:
            raise ValueError(f"{ip_adapter.COLUMN}: missing (this stage has an IP-Adapter)")
        return {"ip_adapter_image": control_images.unpack(data)}

    def record(self, batch: dict[str, list], i: int) -> dict:
        """What the row's stage_params add: its adapters and ControlNet or T2I-Adapter settings."""
        out = {}
        if self.adapters:
            out["loras"] = self.adapters.record(batch[columns.LORA][i])
        if self.spec.ip_adapter:
            out["ip_adapter"] = {"model": self.spec.ip_adapter, "weight_name": self.spec.ip_adapter_weight_name,
                                 "scale": self.spec.ip_adapter_scale}
        if self.spec.t2i_adapter:
            out["t2i_adapter"] = {"model": self.spec.t2i_adapter, "scale": batch["controlnet_scale"][i],
                                  "control_image": self.spec.control.kind if self.spec.control else "manifest"}
        elif self.model_control:
            out["flux_control"] = {"control_image": self.spec.control.kind if self.spec.control else "manifest"}
        elif self.controlled:
            out["controlnet"] = {"models": self.spec.controlnet or ["(the model's own)"],
                                 "scale": batch["controlnet_scale"][i], "start": self.spec.control_start,
                                 "end": self.spec.control_end,
                                 "control_image": self.spec.control.kind if self.spec.control else "manifest"}
            if self.spec.control_mode:
                out["controlnet"]["control_mode"] = self.spec.control_mode
        return out
