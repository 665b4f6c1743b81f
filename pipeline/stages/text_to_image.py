"""text_to_image: prompts to images at the stage's (or the row's) width and height."""

from __future__ import annotations

from pipeline.stages.base import DiffusionStage


class TextToImageStage(DiffusionStage):
    kind = "text_to_image"

    def call_kwargs(self, batch, rows):
        width, height = self.size(batch, rows[0])
        return {"width": width, "height": height}
