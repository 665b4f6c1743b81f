"""text_to_image: prompts to images (Stable Diffusion family, via AutoPipelineForText2Image)."""

from __future__ import annotations

import numpy as np
from diffusers import AutoPipelineForText2Image

from pipeline.stages.base import DiffusionStage, row_generator


class TextToImageStage(DiffusionStage):
    kind = "text_to_image"

    def load(self, path, dtype):
        return AutoPipelineForText2Image.from_pretrained(
            path, dtype=dtype, use_safetensors=True, local_files_only=True
        )

    def group_key(self, batch, i):
        return (batch["steps"][i], batch["guidance_scale"][i], batch["width"][i], batch["height"][i])

    def generate(self, batch, rows):
        steps, guidance, width, height = self.group_key(batch, rows[0])
        out = self.pipe(
            prompt=[batch["prompt"][i] for i in rows],
            negative_prompt=[batch["negative_prompt"][i] for i in rows],
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            generator=[row_generator(batch["seed"][i]) for i in rows],
            output_type="np",
        )
        return list(np.asarray(out.images))
