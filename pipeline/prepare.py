"""CPU step before the GPU stages: fill per-row parameters and seeds, decode input images and
masks, and turn row-level problems into error rows (``status='error'`` with a message naming the
field) while the rest go on."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from pipeline import columns
from pipeline.access import Access
from pipeline.images import InputError, decode
from pipeline.spec import StageSpec, StorageSpec
from pipeline.tables import values, with_column, with_pixels

PROMPTED_KINDS = {"text_to_image", "inpainting", "image_to_image"}
IMAGE_INPUT_KINDS = {"super_resolution", "inpainting", "image_to_image"}
STRENGTH_KINDS = {"inpainting", "image_to_image"}
MAX_SIDE = 4096


def derive_seed(row_id: str) -> int:
    """A row's default seed: a function of its id alone, stable across runs and machines."""
    return int.from_bytes(hashlib.sha256(row_id.encode("utf-8")).digest()[:8], "big") >> 1


def _check_size(name: str, width: int, height: int) -> None:
    for side, size in (("width", width), ("height", height)):
        if size < 8 or size % 8 or size > MAX_SIDE:
            raise InputError(f"{name}: {side} {size} is not a multiple of 8 in 8..{MAX_SIDE}")


class _Row:
    """One row's inputs, checked; any problem raises InputError naming the field."""

    def __init__(self, i: int, cols: dict[str, list], flow: list[StageSpec], storage: StorageSpec, access: Access):
        first = flow[0]
        self.prompt = cols["prompt"][i] or ""
        self.image: np.ndarray | None = None
        self.mask: np.ndarray | None = None
        self.steps = cols["steps"][i] or first.steps
        self.width = cols["width"][i] or first.width
        self.height = cols["height"][i] or first.height
        if first.kind in PROMPTED_KINDS and not self.prompt.strip():
            raise InputError("prompt: empty")
        if not 1 <= self.steps <= 1000:
            raise InputError(f"steps: {self.steps} is outside 1..1000")
        if first.kind in IMAGE_INPUT_KINDS:
            self.image = decode("image", cols["image"][i], "RGB", storage, access)
            self.height, self.width = self.image.shape[:2]
            _check_size("image", self.width, self.height)
        else:
            _check_size("size", self.width, self.height)
        if any(stage.kind == "inpainting" for stage in flow):
            self.mask = decode("mask", cols["mask"][i], "L", storage, access)
            if self.mask.shape != (self.height, self.width):
                raise InputError(
                    f"mask: size {self.mask.shape[1]}x{self.mask.shape[0]} differs from the image's "
                    f"{self.width}x{self.height}"
                )


def prepare_batch(table: pa.Table, flow: list[StageSpec], storage: StorageSpec, access: Access) -> pa.Table:
    first = flow[0]
    names = ("id", "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "strength", "width", "height",
             "image", "mask")
    cols = {name: values(table, name) for name in names}
    rows, errors = [], []
    for i in range(table.num_rows):
        try:
            rows.append(_Row(i, cols, flow, storage, access))
            errors.append(None)
        except InputError as err:
            rows.append(None)
            errors.append(str(err))
    n = table.num_rows
    table = with_pixels(table, [r.image if r else None for r in rows])
    fill = [
        ("prompt", [p or "" for p in cols["prompt"]], pa.string()),
        ("negative_prompt", [p or "" for p in cols["negative_prompt"]], pa.string()),
        ("seed", [derive_seed(i) if s is None else s for i, s in zip(cols["id"], cols["seed"])], pa.int64()),
        ("steps", [r.steps if r else s for r, s in zip(rows, cols["steps"])], pa.int64()),
        ("guidance_scale", [first.guidance_scale if g is None else float(g) for g in cols["guidance_scale"]],
         pa.float64()),
        ("strength", [first.strength if s is None and first.kind in STRENGTH_KINDS else s for s in cols["strength"]],
         pa.float64()),
        ("width", [r.width if r else w for r, w in zip(rows, cols["width"])], pa.int64()),
        ("height", [r.height if r else h for r, h in zip(rows, cols["height"])], pa.int64()),
        ("status", ["error" if e else "ok" for e in errors], pa.string()),
        ("error", errors, pa.string()),
        ("elapsed_s", [0.0] * n, pa.float64()),
        (columns.STAGES, [""] * n, pa.string()),
        (columns.STAGE_PARAMS, ["[]"] * n, pa.string()),
        (columns.MASK, [r.mask.tobytes() if r and r.mask is not None else None for r in rows], pa.binary()),
    ]
    for name, vals, type_ in fill:
        table = with_column(table, name, vals, type_)
    return table


def unrouted_batch(table: pa.Table, flows: list[str]) -> pa.Table:
    """Rows whose `task` names no flow: error rows that say which flows exist."""
    tasks = values(table, "task")
    errors = [f"task: {t!r} is not a flow of this job (flows: {sorted(flows)})" for t in tasks]
    n = table.num_rows
    for name, vals, type_ in [
        ("status", ["error"] * n, pa.string()),
        ("error", errors, pa.string()),
        ("seed", [derive_seed(i) if s is None else s for i, s in zip(values(table, "id"), values(table, "seed"))],
         pa.int64()),
        ("elapsed_s", [0.0] * n, pa.float64()),
        (columns.STAGES, [""] * n, pa.string()),
        (columns.STAGE_PARAMS, ["[]"] * n, pa.string()),
        (columns.PIXELS, [None] * n, pa.binary()),
    ]:
        table = with_column(table, name, vals, type_)
    return table
