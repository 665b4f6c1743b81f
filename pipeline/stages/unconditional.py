"""unconditional: images from noise alone, no prompt (pixel-space DDPM/DDIM UNets and latent
LDMPipeline models), at the model's own size; the stage's scheduler and steps decide the sampler."""

from __future__ import annotations

from pipeline.stages.base import DiffusionStage


class UnconditionalStage(DiffusionStage):
    kind = "unconditional"

    def call_kwargs(self, batch, rows):
        return {"batch_size": len(rows)}
