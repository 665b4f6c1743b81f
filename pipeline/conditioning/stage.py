"""A stage's conditioning, as the stage uses it: at load time the pipeline class and the ControlNet
models it is built with, then the LoRA adapters put into it; at call time the columns it reads,
what rows must share to share a call, the pipeline arguments, and what each row's record says."""

from __future__ import annotations

import pyarrow as pa

from pipeline import columns
from pipeline.conditioning import control_images, controlnet, lora
from pipeline.spec import StageSpec, StorageSpec
from pipeline.tables import values


class Conditioning:
    def __init__(self, spec: StageSpec, storage: StorageSpec | None, position: int, family: str, model_index: dict,
                 plain_class: str):
        self.spec = spec
        self.storage = storage
        self.position = position
        self.pipeline_class = controlnet.pipeline_class(family, spec, model_index, plain_class)
        self.controlled = self.pipeline_class != plain_class
        self.adapters: lora.Adapters | None = None

    def components(self, dtype) -> dict:
        """Load time, step 1: from_pretrained's extra arguments (the stage's ControlNets)."""
        return controlnet.load(self.spec, self.storage, dtype)

    def attach(self, pipe) -> None:
        """Load time, step 2: the LoRA adapters, fused where the stage has one fixed set."""
        self.adapters = lora.Adapters(pipe, self.spec, self.storage) if self.spec.loras else None

    @property
    def controls(self) -> int:
        return max(len(self.spec.controlnet), 1) if self.controlled else 0

    def read(self, table: pa.Table) -> dict[str, list]:
        """The conditioning columns as lists; absent ones read as unset (the stage's own values)."""
        batch = {control_images.internal(k): values(table, control_images.internal(k))
                 for k in range(self.controls)}
        named = lora.JOIN.join(lora.selectable(self.spec))
        batch[columns.LORA] = values(table, columns.LORA, named) if self.position == 0 else [named] * table.num_rows
        if self.controlled:
            scales = values(table, "controlnet_scale") if self.position == 0 else [None] * table.num_rows
            batch["controlnet_scale"] = [self.spec.controlnet_scale if s is None else s for s in scales]
        return batch

    def group_key(self, batch: dict[str, list], i: int) -> tuple:
        """What rows must share to share a call: their adapter set and ControlNet scale."""
        return (batch[columns.LORA][i], batch["controlnet_scale"][i] if self.controlled else None)

    def call_args(self, pipe_takes: set[str], batch: dict[str, list], rows: list[int], width: int,
                  height: int) -> dict:
        """Call time: switch to the rows' adapters; the control images as pipeline arguments."""
        if self.adapters:
            self.adapters.use(batch[columns.LORA][rows[0]])
        if not self.controlled:
            return {}
        images = []
        for k in range(self.controls):
            name = control_images.column(k)
            per_row = []
            for i in rows:
                data = batch[control_images.internal(k)][i]
                if data is None:
                    raise ValueError(f"{name}: missing (this stage has a ControlNet)")
                image = control_images.unpack(data)
                if image.size != (width, height):
                    raise ValueError(f"{name}: size {image.width}x{image.height} differs from the {width}x{height} "
                                     "image this stage makes")
                per_row.append(image)
            images.append(per_row)
        return controlnet.call_args(pipe_takes, self.spec, images, batch["controlnet_scale"][rows[0]])

    def record(self, batch: dict[str, list], i: int) -> dict:
        """What the row's stage_params add: its adapters and ControlNet settings."""
        out = {}
        if self.adapters:
            out["loras"] = self.adapters.record(batch[columns.LORA][i])
        if self.controlled:
            out["controlnet"] = {"models": self.spec.controlnet or ["(the model's own)"],
                                 "scale": batch["controlnet_scale"][i], "start": self.spec.control_start,
                                 "end": self.spec.control_end,
                                 "control_image": self.spec.control.kind if self.spec.control else "manifest"}
        return out
