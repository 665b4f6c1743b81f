"""The driver's checks of a stage's conditioning, before any actor starts (exit 2 on a problem):
each ControlNet is a ControlNet folder, the family has a ControlNet pipeline for the kind, and each
LoRA adapter can be fetched and, when the model is a folder on this machine, fits it."""

from __future__ import annotations

from pipeline.conditioning import controlnet, lora
from pipeline.spec import StageSpec, StorageSpec


def check_stage(stage: StageSpec, family, model_index: dict, storage_spec: StorageSpec | None) -> None:
    from pipeline import storage
    from pipeline.models import hub
    from pipeline.models.resolve import _locate

    pipeline_class = controlnet.pipeline_class(family.name, stage, model_index, family.pipelines[stage.kind])
    controlnet.check(stage, storage_spec)
    # A hub or remote model's weights are not on the driver: its adapters' fit is checked as it loads.
    here = not (hub.is_hub_id(stage.model) or storage.is_remote(stage.model))
    folder = _locate(stage.model, storage_spec, None, None) if here else None
    lora.check(stage, pipeline_class, folder, storage_spec)
