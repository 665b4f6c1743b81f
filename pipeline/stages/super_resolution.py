"""super_resolution: a low-resolution image guides generation at a larger size: the x4 upscaler
(the image noised to ``noise_level`` by its low-res scheduler), the latent x2 upscaler or DeepFloyd
IF stage II (x4, with stage I's T5 prompt embeddings)."""

from __future__ import annotations

from pipeline.stages.base import DiffusionStage, to_pil


class SuperResolutionStage(DiffusionStage):
    kind = "super_resolution"

    def call_kwargs(self, batch, rows):
        kwargs = {"image": to_pil(batch["pixels"], rows)}
        if "noise_level" in self.takes:
            kwargs["noise_level"] = self.spec.noise_level
        if "height" in self.takes:  # DeepFloyd IF stage II makes its unet's sample size unless told
            width, height = self.size(batch, rows[0])
            kwargs["width"], kwargs["height"] = width * self.family.scale, height * self.family.scale
        return kwargs
