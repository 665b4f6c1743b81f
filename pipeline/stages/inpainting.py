"""inpainting: repaint the white part of a mask (9-channel inpainting models, FLUX.1 Fill, and
plain checkpoints by blending latents as diffusers does).

The pipeline round-trips the whole image through the VAE, which blurs what it should keep; the
pixels under black mask stay exactly the input's here.
"""

from __future__ import annotations

from pipeline.images import keep_unmasked
from pipeline.stages.base import DiffusionStage, to_pil


class InpaintingStage(DiffusionStage):
    kind = "inpainting"

    def call_kwargs(self, batch, rows):
        width, height = self.size(batch, rows[0])
        return {"image": to_pil(batch["pixels"], rows), "mask_image": to_pil(batch["mask"], rows),
                "strength": self.param(batch, "strength", rows[0]), "height": height, "width": width}

    def finish(self, image, batch, i):
        return keep_unmasked(batch["pixels"][i] / 255.0, image, batch["mask"][i])
