"""text_to_image: prompts to images (Stable Diffusion family, via AutoPipelineForText2Image)."""

from __future__ import annotations

from diffusers import AutoPipelineForText2Image

from pipeline.stages.base import DiffusionStage


class TextToImageStage(DiffusionStage):
    kind = "text_to_image"
    inputs = (*DiffusionStage.inputs, "width", "height")

    def load(self, path, dtype):
        return AutoPipelineForText2Image.from_pretrained(path, dtype=dtype, use_safetensors=True, local_files_only=True)

    def group_extra(self, batch, i):
        return (batch["width"][i], batch["height"][i])

    def call_kwargs(self, batch, rows):
        return {"width": batch["width"][rows[0]], "height": batch["height"][rows[0]]}
