"""Captions in the phrasings people write, and the phrasings held out of training.

A phrasing is a template over the scene's words: ``{colour}``, ``{a_colour}`` ("an orange"),
``{shape}``, ``{shapes}`` (plural), ``{bg}``, ``{a_bg}``. Training draws the original template
(``TEMPLATE``), one of ``TRAIN_PHRASINGS``, or the empty caption; ``HELD_OUT_PHRASINGS`` were
chosen before the retraining started and are never drawn in training (``test_training.py``
checks it), so the evaluator's held-out figures measure phrasings the models have not seen.
Phrasings without ``{bg}`` leave the background to the model.
"""

from __future__ import annotations

import torch

from pipeline.training.data import Scene
from pipeline.training.latents import token_ids

# What the first models were trained on, and all they followed (issue 16).
TEMPLATE = "{a_colour} {shape} on {a_bg} background"

# Bodies with and without the background, word orders, comma lists, articles, plurals.
_BODIES = (
    "{colour} {shape} on {a_bg} background",
    "the {colour} {shape} on the {bg} background",
    "one {colour} {shape} on {a_bg} background",
    "{colour} {shapes} on {a_bg} background",
    "{a_colour} {shape} on {bg}",
    "{a_colour} {shape} against {a_bg} background",
    "{a_colour} {shape} over {a_bg} background",
    "{a_colour} {shape} with {a_bg} background",
    "{a_colour} {shape}, {bg} background",
    "{colour} {shape}, {bg} background",
    "{colour}, {shape}, {bg} background",
    "{shape}, {colour}, on {bg}",
    "{bg} background, {colour} {shape}",
    "{a_bg} background with {a_colour} {shape}",
    "{shape} in {colour} on {a_bg} background",
    "{colour} {shape}",
    "the {colour} {shape}",
    "{colour} {shapes}",
    "{shape}, {colour}",
    "{shape} in {colour}",
    "one {colour} {shape}",
)
_PREFIXES = ("", "a drawing of ", "a picture of ", "an image of ", "a painting of ")

# Never drawn in training. The first three are issue 16's measured forms (bare, comma list, "a
# photo of": "photo" is a word no training caption has); the others a connective ("in front
# of") and a plural form without articles or the word "background" that training lacks.
HELD_OUT_PHRASINGS = (
    "{a_colour} {shape}",
    "{shape}, {colour}, {bg} background",
    "a photo of {a_colour} {shape} on {a_bg} background",
    "{a_colour} {shape} in front of {a_bg} background",
    "{colour} {shapes} on {bg}",
)
TRAIN_PHRASINGS = tuple(
    p + b for p in _PREFIXES for b in (TEMPLATE, *_BODIES) if p + b not in HELD_OUT_PHRASINGS and p + b != TEMPLATE
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def phrase(phrasing: str, shape: str, colour: str, background: str) -> str:
    """``phrasing`` filled with a scene's words: phrase(TEMPLATE, "circle", "red", "blue") is
    "a red circle on a blue background"."""
    return phrasing.format(
        colour=colour, a_colour=f"{_article(colour)} {colour}", shape=shape, shapes=f"{shape}s",
        bg=background, a_bg=f"{_article(background)} {background}",
    )


def mentions_background(phrasing: str) -> bool:
    return "{bg}" in phrasing or "{a_bg}" in phrasing


class CaptionSampler:
    """Token ids of a fresh caption per drawn scene: the template (``template_share``), a training
    phrasing that leaves the background out (``shape_only_share`` of the rest), any other training
    phrasing, or the empty caption (``uncond_share``, for classifier-free guidance)."""

    def __init__(self, tokenizer, scenes: list[Scene], template_share: float, uncond_share: float,
                 shape_only_share: float = 0.0):
        self.tokenizer, self.scenes = tokenizer, scenes
        self.phrasings = (TEMPLATE, *TRAIN_PHRASINGS)
        self.shape_only = tuple(p for p in TRAIN_PHRASINGS if not mentions_background(p))
        self.template_share, self.uncond_share, self.shape_only_share = template_share, uncond_share, shape_only_share

    def __call__(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return token_ids(self.tokenizer, self.texts(idx, generator)[0])

    def texts(self, idx: torch.Tensor, generator: torch.Generator) -> tuple[list[str], list[str]]:
        """The drawn captions, and the template captions of the same scenes (both empty where the
        caption is dropped): what the upscaler's caption distillation pairs."""
        n = len(idx)
        template = torch.rand(n, generator=generator) < self.template_share
        other = 1 + torch.randint(len(self.phrasings) - 1, (n,), generator=generator)
        drop = torch.rand(n, generator=generator) < self.uncond_share
        shape_only = torch.rand(n, generator=generator) < self.shape_only_share
        shape_only_pick = torch.randint(len(self.shape_only), (n,), generator=generator)
        captions, templates = [], []
        for d, t, s, pick, o, scene in zip(drop.tolist(), template.tolist(), shape_only.tolist(), shape_only_pick.tolist(),
                                           other.tolist(), (self.scenes[i] for i in idx.tolist())):
            phrasing = TEMPLATE if t else self.shape_only[pick] if s else self.phrasings[o]
            captions.append("" if d else phrase(phrasing, scene.shape, scene.colour, scene.background))
            templates.append("" if d else scene.caption)
        return captions, templates


def held_out_captions(scenes: list[Scene], phrasings: tuple[str, ...] = HELD_OUT_PHRASINGS) -> list[str]:
    """Scene i in held-out phrasing i mod len(phrasings) (each phrasing gets a fair share)."""
    return [phrase(phrasings[i % len(phrasings)], s.shape, s.colour, s.background) for i, s in enumerate(scenes)]

