"""One module per diffusion stage; stage_class maps a spec's ``kind`` to its class."""

from __future__ import annotations

import importlib

_CLASSES = {
    "text_to_image": ("pipeline.stages.text_to_image", "TextToImageStage"),
    "super_resolution": ("pipeline.stages.super_resolution", "SuperResolutionStage"),
    "inpainting": ("pipeline.stages.inpainting", "InpaintingStage"),
    "image_to_image": ("pipeline.stages.image_to_image", "ImageToImageStage"),
}


def stage_class(kind: str):
    # Imported on demand: a stage module pulls in torch and diffusers, which the driver of a
    # cluster job need not load.
    module, name = _CLASSES[kind]
    return getattr(importlib.import_module(module), name)
