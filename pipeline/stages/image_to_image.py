"""image_to_image: text-guided image-to-image (AutoPipelineForImage2Image): the input image is
noised to ``strength`` and denoised towards the prompt."""

from __future__ import annotations

from diffusers import AutoPipelineForImage2Image

from pipeline.stages.base import DiffusionStage, to_pil


class ImageToImageStage(DiffusionStage):
    kind = "image_to_image"
    inputs = (*DiffusionStage.inputs, "strength", "pixels")
    params = (*DiffusionStage.params, "strength")

    def load(self, path, dtype):
        return AutoPipelineForImage2Image.from_pretrained(path, dtype=dtype, use_safetensors=True, local_files_only=True)

    def group_extra(self, batch, i):
        return (self.param(batch, "strength", i), batch["pixels"][i].shape)

    def call_kwargs(self, batch, rows):
        return {"image": to_pil(batch["pixels"], rows), "strength": self.param(batch, "strength", rows[0])}
