"""One module per diffusion stage; STAGES maps a spec's ``kind`` to its class."""

from __future__ import annotations


def stage_class(kind: str):
    # Imported on demand: a stage module pulls in torch and diffusers, which the driver of a
    # cluster job need not load.
    if kind == "text_to_image":
        from pipeline.stages.text_to_image import TextToImageStage

        return TextToImageStage
    raise NotImplementedError(f"stage kind {kind!r} is not implemented yet")
