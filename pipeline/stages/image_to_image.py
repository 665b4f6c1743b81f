"""image_to_image: the input image is noised to ``strength`` and denoised towards the prompt
(also the SDXL refiner's use); editing models (FLUX.1 Kontext, Qwen-Image-Edit) take it with an
instruction prompt, and those that take several images (FLUX.2, Qwen-Image-Edit-Plus) the row's
reference_images after it."""

from __future__ import annotations

import io

from PIL import Image

from pipeline.stages.base import DiffusionStage, to_pil


class ImageToImageStage(DiffusionStage):
    kind = "image_to_image"

    def call_kwargs(self, batch, rows):
        kwargs = {"image": to_pil(batch["pixels"], rows), "strength": self.param(batch, "strength", rows[0])}
        references = [data for i in rows for data in batch["references"][i] or []]
        if references:  # one row per call (group): its image, then its references
            if not self.family.references:
                raise ValueError(f"reference_images: {self.pipeline_class} ({self.family.title}) takes one image")
            kwargs["image"] += [Image.open(io.BytesIO(data)).convert("RGB") for data in references]
        if "height" in self.takes:  # FLUX.1 and SD3 take the output size; others keep the image's
            kwargs["width"], kwargs["height"] = self.size(batch, rows[0])
        return kwargs
