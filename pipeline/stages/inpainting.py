"""inpainting: repaint the white part of a mask (AutoPipelineForInpainting: 9-channel inpainting
UNets, and plain 4-channel checkpoints by blending latents as diffusers does).

The pipeline round-trips the whole image through the VAE, which blurs what it should keep; the
pixels under black mask stay exactly the input's here.
"""

from __future__ import annotations

from diffusers import AutoPipelineForInpainting

from pipeline.images import keep_unmasked
from pipeline.stages.base import DiffusionStage, to_pil


class InpaintingStage(DiffusionStage):
    kind = "inpainting"
    inputs = (*DiffusionStage.inputs, "strength", "pixels", "mask")
    params = (*DiffusionStage.params, "strength")

    def load(self, path, dtype):
        return AutoPipelineForInpainting.from_pretrained(path, dtype=dtype, use_safetensors=True, local_files_only=True)

    def group_extra(self, batch, i):
        return (self.param(batch, "strength", i), batch["pixels"][i].shape)

    def call_kwargs(self, batch, rows):
        height, width = batch["pixels"][rows[0]].shape[:2]
        return {"image": to_pil(batch["pixels"], rows), "mask_image": to_pil(batch["mask"], rows),
                "strength": self.param(batch, "strength", rows[0]), "height": height, "width": width}

    def finish(self, image, batch, i):
        return keep_unmasked(batch["pixels"][i] / 255.0, image, batch["mask"][i])
