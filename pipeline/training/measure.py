"""Reading a scene back from pixels: background colour, foreground colour, foreground alpha.

No model is needed: the background is the median colour of the image's border (shapes never touch
it), a pixel's alpha is its projection onto the background-to-foreground colour line, and colours
are named by the nearest palette entry. The shape is then told from the alpha map by the small
classifier in classifier.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.training.data import COLOURS, PALETTE

_PALETTE = np.array([PALETTE[c] for c in COLOURS], np.float32)
# Below this RGB distance from the background nothing counts as a shape (an empty image).
MIN_CONTRAST = 40.0


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None  # None when no pixel stands out from the background
    alpha: np.ndarray  # H x W in [0, 1]: how much of each pixel is foreground


def nearest_colour(rgb: np.ndarray) -> str:
    return COLOURS[int(np.argmin(np.linalg.norm(_PALETTE - np.asarray(rgb, np.float32), axis=1)))]


def border_colour(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def read(image: np.ndarray, region: np.ndarray | None = None, background: np.ndarray | None = None) -> Reading:
    """Measure an H x W x 3 uint8 image. ``region`` (H x W bool) limits where the foreground is
    looked for (the repainted box when inpainting); ``background`` overrides the border's colour."""
    pixels = image.astype(np.float32)
    bg = border_colour(image) if background is None else np.asarray(background, np.float32)
    distance = np.linalg.norm(pixels - bg, axis=-1)
    if region is not None:
        distance = np.where(region, distance, 0.0)
    peak = float(np.percentile(distance[region] if region is not None else distance, 99))
    if peak < MIN_CONTRAST:
        return Reading(nearest_colour(bg), None, np.zeros(image.shape[:2], np.float32))
    # The foreground colour: the median of the clearly-not-background pixels (edges are blends).
    core = distance >= 0.6 * peak
    fg = np.median(pixels[core], axis=0)
    direction = fg - bg
    alpha = np.clip(((pixels - bg) @ direction) / float(direction @ direction), 0.0, 1.0)
    if region is not None:
        alpha = np.where(region, alpha, 0.0)
    return Reading(nearest_colour(bg), nearest_colour(fg), alpha.astype(np.float32))
