"""image_to_image: the input image is noised to ``strength`` and denoised towards the prompt
(also the SDXL refiner's use)."""

from __future__ import annotations

from pipeline.stages.base import DiffusionStage, to_pil


class ImageToImageStage(DiffusionStage):
    kind = "image_to_image"

    def call_kwargs(self, batch, rows):
        kwargs = {"image": to_pil(batch["pixels"], rows), "strength": self.param(batch, "strength", rows[0])}
        if "height" in self.takes:  # FLUX.1 and SD3 take the output size; others keep the image's
            kwargs["width"], kwargs["height"] = self.size(batch, rows[0])
        return kwargs
