"""The stage kinds, in one table: what each kind takes from a row, which manifest columns it needs
when it is first in a flow, which per-row overrides it honours, what its stage_params record lists
and how much larger its images come out than its input.

The spec, the manifest checks, the prepare step and the stages all read this table; it imports
nothing heavy, so the driver can use it without torch or diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str
    stage_class: str  # the class in pipeline/stages/<name>.py
    inputs: tuple[str, ...]  # what a row gives the stage: "prompt", "image" (RGB), "mask" (L)
    prompt_required: bool  # an empty prompt makes an error row
    overrides: tuple[str, ...]  # manifest columns that override the first stage's spec values per row
    params: tuple[str, ...]  # spec fields its stage_params record lists (where its pipeline takes them)
    size_from: str  # where the first stage's output size comes from: "spec", "image" or "model"
    scale: int = 1  # output side / input side; the largest of the kind's families

    @property
    def manifest_columns(self) -> tuple[str, ...]:
        """The columns a manifest must have when this kind is first in a flow."""
        return tuple(c for c in self.inputs if c != "prompt" or self.prompt_required)

    @property
    def takes_image(self) -> bool:
        return "image" in self.inputs


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("text_to_image", "TextToImageStage", ("prompt",), True,
         ("steps", "guidance_scale", "width", "height"), ("steps", "guidance_scale"), "spec"),
    Kind("image_to_image", "ImageToImageStage", ("prompt", "image"), True,
         ("steps", "guidance_scale", "strength"), ("steps", "guidance_scale", "strength"), "image"),
    Kind("inpainting", "InpaintingStage", ("prompt", "image", "mask"), True,
         ("steps", "guidance_scale", "strength"), ("steps", "guidance_scale", "strength"), "image"),
    # The x4 upscaler makes 4x, the latent upscaler 2x; limits are checked at x4.
    Kind("super_resolution", "SuperResolutionStage", ("prompt", "image"), False,
         ("steps", "guidance_scale"), ("steps", "guidance_scale", "noise_level"), "image", scale=4),
    Kind("unconditional", "UnconditionalStage", (), False, ("steps",), ("steps",), "model"),
)}
