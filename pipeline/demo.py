"""The embedded default: a sample manifest and spec that run on local Ray, local files and the
built-in models, with no GPU and no network.

The manifest mixes two flows: prompts through the text_to_image -> super_resolution cascade, and
drawn shapes with masks through inpainting.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.spec import JobSpec, parse_spec
from pipeline.training import data
from pipeline.training.captions import phrase

COLOURS = data.COLOURS  # the 8 colours the trained models know
SHAPES = ["circle", "square", "triangle"]
BACKGROUNDS = ["blue", "white", "black", "green"]
IMAGE_SIZE = 32  # the size the trained shape models know
# Three actor pools and the CPU steps share a laptop-sized machine (2 CPUs here).
SMALL_NODE = {"actors": 1, "cpus_per_actor": 0.5}


def caption(i: int) -> tuple[str, str, str]:
    names = list(COLOURS)
    colour = names[i % len(names)]
    shape = SHAPES[(i // len(names)) % len(SHAPES)]
    background = BACKGROUNDS[(i // 3) % len(BACKGROUNDS)]
    if background == colour:
        background = "yellow"
    return colour, shape, background


# Prompts as people write them: the trained models follow many phrasings, not one template
# (docs/trained-models.md; "a photo of ..." and the comma list are phrasings held out of training).
# Each names its background: left to the model, it may pick the shape's own colour (a blank image).
PHRASINGS = (
    "{a_colour} {shape} on {a_bg} background",
    "{colour} {shape}, {bg} background",
    "a drawing of {a_colour} {shape} on {a_bg} background",
    "a photo of {a_colour} {shape} on {a_bg} background",
    "{a_colour} {shape} against {a_bg} background",
    "{shape}, {colour}, {bg} background",
    "the {colour} {shape} on the {bg} background",
)
INPAINT_PHRASINGS = ("{a_colour} {shape}", "{colour} {shape}", "a {shape} in {colour}")


def sample_prompts(rows: int) -> list[str]:
    return [phrase(PHRASINGS[i % len(PHRASINGS)], s, c, b) for i, (c, s, b) in enumerate(map(caption, range(rows)))]


def inpaint_request(i: int) -> tuple[str, str]:
    """What an inpainted row asks for: its shape in the next colour of the list that is not its
    background's (a shape in the background's colour would be invisible)."""
    names = list(COLOURS)
    _, shape, background = caption(i)
    colour = names[(i + 1) % len(names)]
    return (names[(i + 2) % len(names)] if colour == background else colour), shape


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def drawn_scene(i: int) -> tuple[bytes, bytes]:
    """A shape to repaint, drawn as the shape models' training scenes are (antialiased, palette
    colours): the scene as PNG bytes, and a mask (white = repaint) over the shape's box, padded 4
    pixels and aligned to the VAE's 4-pixel cells."""
    colour, shape, background = caption(i)
    scene = data.Scene(shape, colour, background, cx=0.5, cy=0.5, radius=0.25)
    mask = data.box_mask(data.shape_box(scene, IMAGE_SIZE, align=4, pad_px=4), IMAGE_SIZE)
    return _png(Image.fromarray(data.render(scene, IMAGE_SIZE))), _png(Image.fromarray((mask * 255).astype(np.uint8)))


def write_manifest(path: Path, rows: int) -> Path:
    """Three rows in four go through the cascade, one in four is inpainted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for i, prompt in enumerate(sample_prompts(rows)):
        record = {"id": f"demo-{i:05d}", "task": "cascade", "prompt": prompt, "image": None, "mask": None,
                  "split": "train" if i % 10 else "test"}
        if i % 4 == 3:
            scene, mask = drawn_scene(i)
            colour, shape = inpaint_request(i)
            prompt = phrase(INPAINT_PHRASINGS[(i // 4) % len(INPAINT_PHRASINGS)], shape, colour, caption(i)[2])
            record.update(task="inpaint", prompt=prompt, image=scene, mask=mask)
        records.append(record)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def demo_spec(folder: Path, rows: int) -> JobSpec:
    manifest = write_manifest(folder / "manifest.parquet", rows)
    return parse_spec({
        "manifest": str(manifest),
        "output": str(folder / "dataset"),
        "flows": {
            "cascade": [
                {"kind": "text_to_image", "model": "builtin:shapes-t2i", "steps": 20, "guidance_scale": 4.0,
                 "width": 32, "height": 32, "batch_size": 8, **SMALL_NODE},
                {"kind": "super_resolution", "model": "builtin:shapes-sr", "steps": 20, "guidance_scale": 1.0,
                 "noise_level": 20, "batch_size": 8, **SMALL_NODE},
            ],
            "inpaint": [{"kind": "inpainting", "model": "builtin:shapes-inpaint", "steps": 20, "guidance_scale": 4.0,
                         "strength": 1.0, "batch_size": 8, **SMALL_NODE}],
        },
        "format": {"rows_per_shard": 100},
    })
