"""The procedural training set: one flat-coloured shape on a flat background, with its caption.

Nothing is downloaded: a scene is a few numbers drawn from a seeded generator, and images of any
size are rendered from it, so the 32x32 training image and the 128x128 super-resolution target
are two renders of the same scene. Shapes are implicit functions of coordinates relative to the
shape's centre and size; pixels are antialiased by averaging a supersampled coverage grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Well separated in RGB, so that "nearest named colour" is unambiguous when measuring results.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (130, 40, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")

LOW_RES = 32
HIGH_RES = 128
# Half-extent of a shape, in pixels of the 32x32 image: large enough to tell shapes apart.
MIN_RADIUS_PX, MAX_RADIUS_PX = 6.0, 12.0
MARGIN_PX = 1.0


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    # Centre and half-extent as fractions of the image side, so any resolution renders it.
    cx: float
    cy: float
    radius: float

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(shape: str, colour: str, background: str) -> str:
    """"a red circle on a blue background", "an orange square on a white background"."""
    return f"{_article(colour)} {colour} {shape} on {_article(background)} {background} background"


def sample_scenes(n: int, seed: int) -> list[Scene]:
    """``n`` scenes, a pure function of ``seed``: uniform over shapes, colour pairs, size, place."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour_i = rng.integers(len(COLOURS))
        # The background is any other colour, so the shape is always visible.
        background_i = (colour_i + 1 + rng.integers(len(COLOURS) - 1)) % len(COLOURS)
        radius = rng.uniform(MIN_RADIUS_PX, MAX_RADIUS_PX) / LOW_RES
        lo, hi = radius + MARGIN_PX / LOW_RES, 1.0 - radius - MARGIN_PX / LOW_RES
        cx, cy = rng.uniform(lo, hi, size=2)
        scenes.append(Scene(shape, COLOURS[colour_i], COLOURS[background_i], float(cx), float(cy), float(radius)))
    return scenes


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v), relative to the centre in units of the radius (v down), are inside."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        # A little smaller than the radius, so a square's area is close to a circle's.
        return np.maximum(au, av) <= 0.85
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "triangle":
        # Apex up at v = -1, base at v = 0.8.
        return (v >= -1.0) & (v <= 0.8) & (au <= (v + 1.0) / 1.8)
    if shape == "cross":
        arm = 0.33
        return ((au <= arm) & (av <= 1.0)) | ((av <= arm) & (au <= 1.0))
    raise ValueError(f"unknown shape {shape!r}; shapes: {SHAPES}")


def coverage(scene: Scene, size: int, supersample: int = 4) -> np.ndarray:
    """The fraction of each of the ``size`` x ``size`` pixels that the shape covers, in [0, 1]."""
    n = size * supersample
    centres = (np.arange(n) + 0.5) / n
    u = (centres[None, :] - scene.cx) / scene.radius
    v = (centres[:, None] - scene.cy) / scene.radius
    inside = _inside(scene.shape, u, v).astype(np.float32)
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def render(scene: Scene, size: int = LOW_RES, supersample: int = 4) -> np.ndarray:
    """The scene as a ``size`` x ``size`` x 3 uint8 image."""
    alpha = coverage(scene, size, supersample)[..., None]
    fg = np.array(PALETTE[scene.colour], np.float32)
    bg = np.array(PALETTE[scene.background], np.float32)
    return np.round(alpha * fg + (1.0 - alpha) * bg).astype(np.uint8)


def render_all(scenes: list[Scene], size: int = LOW_RES, supersample: int | None = None) -> np.ndarray:
    """N x size x size x 3 uint8. Antialiasing uses a 128-pixel-or-finer grid at any size."""
    ss = supersample or max(2, -(-128 // size))
    return np.stack([render(s, size, ss) for s in scenes])


def to_tensor_range(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC to float32 NCHW in [-1, 1], the range diffusers' VAEs work in."""
    return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def shape_box(scene: Scene, size: int, align: int = 1, pad_px: float = 1.0) -> tuple[int, int, int, int]:
    """The shape's bounding box (top, left, bottom, right; exclusive) in a ``size`` image, padded,
    and widened outward to multiples of ``align`` (the VAE's scale factor, so the box covers whole
    latent cells: the inpainting pipeline resizes the mask to the latent grid)."""
    half = scene.radius * size + pad_px * size / LOW_RES
    top, bottom = scene.cy * size - half, scene.cy * size + half
    left, right = scene.cx * size - half, scene.cx * size + half
    top, left = int(np.floor(top / align) * align), int(np.floor(left / align) * align)
    bottom, right = int(np.ceil(bottom / align) * align), int(np.ceil(right / align) * align)
    return max(0, top), max(0, left), min(size, bottom), min(size, right)


def box_mask(box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """A size x size float32 mask, 1 inside ``box`` (white = repaint, as the pipelines expect)."""
    top, left, bottom, right = box
    mask = np.zeros((size, size), np.float32)
    mask[top:bottom, left:right] = 1.0
    return mask
