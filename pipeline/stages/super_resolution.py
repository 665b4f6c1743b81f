"""super_resolution: the x4 upscaler family (StableDiffusionUpscalePipeline): a low-resolution
image, noised to ``noise_level`` by the pipeline's low-res scheduler, guides generation at four
times its size."""

from __future__ import annotations

from diffusers import StableDiffusionUpscalePipeline

from pipeline.stages.base import DiffusionStage, to_pil


class SuperResolutionStage(DiffusionStage):
    kind = "super_resolution"
    inputs = (*DiffusionStage.inputs, "pixels")
    params = (*DiffusionStage.params, "noise_level")

    def load(self, path, dtype):
        return StableDiffusionUpscalePipeline.from_pretrained(
            path, dtype=dtype, use_safetensors=True, local_files_only=True
        )

    def group_extra(self, batch, i):
        return batch["pixels"][i].shape

    def call_kwargs(self, batch, rows):
        return {"image": to_pil(batch["pixels"], rows), "noise_level": self.spec.noise_level}
