"""`shardgen manifest synth --control-maps DIR`: a folder of label maps -> a manifest for a
ControlNet job whose images come out labelled.

A label map is a PNG whose pixel values are class indices (0 is the first class of the classes
file). Each map makes one row: `control_image` (the map colour-coded: class k in palette(k)),
`label_map` (the map itself, the target that stays beside the image in the output and the
WebDataset export), a prompt from a template whose {class} names the classes present (a class
named "background" is never named), a seed, a split and `classes_present`. Everything is a
function of ``seed`` and the folder's contents.
"""

from __future__ import annotations

import colorsys
import io
import json

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline import storage
from pipeline.errors import SpecError
from pipeline.synth.manifest import (
    LABELS_KEY,
    MAX_SEED,
    ClassDef,
    TemplateSet,
    _fill,
    _split_counts,
    load_classes,
    load_templates,
    parse_splits,
    write,
)

BACKGROUND = "background"
DEFAULT_TEMPLATE = TemplateSet(templates=["{class}"])


def palette(k: int) -> tuple[int, int, int]:
    """Class k's colour in control images: black for 0, then hues a golden angle apart, so that
    neighbouring indices differ most."""
    if k == 0:
        return (0, 0, 0)
    r, g, b = colorsys.hsv_to_rgb(((k - 1) * 0.618034) % 1.0, 0.85, 1.0)
    return (round(r * 255), round(g * 255), round(b * 255))


def colour_coded(label_map: np.ndarray, classes: int) -> np.ndarray:
    """The HxW class-index map as an HxWx3 control image."""
    lut = np.array([palette(k) for k in range(classes)], dtype=np.uint8)
    return lut[label_map]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def read_map(uri: str, classes: int) -> np.ndarray:
    """A label map as an HxW uint8 array of class indices; SpecError names a bad file."""
    try:
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise SpecError(f"--control-maps: {uri} is a {img.mode} image; a label map holds one class index "
                                "per pixel (mode L or P)")
            array = np.asarray(img)
    except OSError as err:
        raise SpecError(f"--control-maps: {uri} is not a readable PNG ({err})") from None
    if array.max() >= classes:
        raise SpecError(f"--control-maps: {uri} has class index {int(array.max())}, but the classes file names "
                        f"{classes} classes (0..{classes - 1})")
    return array.astype(np.uint8)


def build(maps: str, classes: list[ClassDef], templates: TemplateSet, seed: int,
          splits: dict[str, float]) -> pa.Table:
    files = sorted(f for f in storage.list_files(maps) if f.lower().endswith(".png") and "/" not in f)
    if not files:
        raise SpecError(f"--control-maps: no .png label maps in {maps}")
    rng = np.random.default_rng(seed)
    split_of = [name for name, count in _split_counts(len(files), splits).items() for _ in range(count)]
    order = rng.permutation(len(files))
    seeds = rng.choice(MAX_SEED, size=len(files), replace=False)
    rows = []
    for i, name in enumerate(files):
        label_map = read_map(storage.join(maps, name), len(classes))
        present = [classes[k].name for k in np.unique(label_map) if classes[k].name != BACKGROUND]
        named = ClassDef(name=" and ".join(present) or BACKGROUND)
        prompt, _, values = _fill(rng, named, templates)
        rows.append({"id": name.rsplit(".", 1)[0], "prompt": prompt, "seed": int(seeds[i]),
                     "split": split_of[order[i]], "classes_present": present,
                     "control_image": _png(colour_coded(label_map, len(classes))), "label_map": _png(label_map),
                     **values})
    table = pa.Table.from_pylist(rows)
    return table.replace_schema_metadata({LABELS_KEY: json.dumps([c.name for c in classes]).encode()})


def main(maps: str, classes: str, templates: str | None, seed: int, splits: str, output: str) -> pa.Table:
    table = build(maps, load_classes(classes), load_templates(templates) if templates else DEFAULT_TEMPLATE, seed,
                  parse_splits(splits))
    write(table, output)
    return table
