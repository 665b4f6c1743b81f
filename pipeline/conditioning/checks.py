"""The driver's checks of a stage's conditioning, before any actor starts (exit 2 on a problem):
each ControlNet or T2I-Adapter is a folder of its kind (a ControlNet Union with its control types),
the family has a pipeline for the kind with it, an IP-Adapter is one and the family takes it, and
each LoRA adapter can be fetched and, when the model is a folder on this machine, fits it."""

from __future__ import annotations

from pathlib import Path

from pipeline.conditioning import controlnet, ip_adapter, lora
from pipeline.errors import ModelError
from pipeline.spec import StageSpec, StorageSpec


def check_stage(stage: StageSpec, family, model_index: dict, storage_spec: StorageSpec | None,
                folder: Path | None) -> None:
    """``folder``: the model's folder on this machine; None for a hub or remote model, whose
    adapters' fit is checked as it loads."""
    controlnet.check(stage, model_index, storage_spec)
    pipeline_class = controlnet.pipeline_class(family.name, stage, model_index, family.pipelines[stage.kind],
                                               storage_spec)
    problem = (controlnet.settings_problem(pipeline_class, stage) or controlnet.several_problem(pipeline_class, stage)
               if stage.controlnet else None)
    if problem:
        raise ModelError(problem)
    ip_adapter.check(stage, family.name, pipeline_class, storage_spec)
    lora.check(stage, pipeline_class, folder, storage_spec)
