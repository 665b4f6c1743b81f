"""CPU step before the GPU stages: fill per-row parameters and seeds, decode input images and
masks, and turn row-level problems into error rows (``status='error'`` with a message naming the
field) while the rest go on."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from pipeline import columns
from pipeline.access import Access
from pipeline.conditioning import rows as conditioning
from pipeline.images import InputError, decode, png_bytes
from pipeline.kinds import KINDS
from pipeline.spec import LimitsSpec, StageSpec, StorageSpec
from pipeline.tables import values, with_column, with_pixels

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# Reference images a row may give an editing model beside its image (FLUX.2 takes up to 10).
MAX_REFERENCES = 10


def derive_seed(row_id: str) -> int:
    """A row's default seed: a function of its id alone, stable across runs and machines."""
    return int.from_bytes(hashlib.sha256(row_id.encode("utf-8")).digest()[:8], "big") >> 1


def _int64(value: int | None) -> int | None:
    """A manifest integer for an int64 output column; one out of range (an unsigned column can
    hold one) belongs to an error row and is left out."""
    return value if value is not None and INT64_MIN <= value <= INT64_MAX else None


def _seeds(ids: list[str], seeds: list[int | None]) -> list[int | None]:
    return [derive_seed(i) if s is None else _int64(s) for i, s in zip(ids, seeds)]


def _size_problem(width: int, height: int, limits: LimitsSpec) -> str | None:
    for side, size in (("width", width), ("height", height)):
        if size < 8 or size % 8:
            return f"{side} {size} is not a positive multiple of 8"
    return limits.size_problem(width, height)


class _Row:
    """One row's inputs, checked against the job's limits; any problem raises InputError naming
    the field, the value and the limit."""

    def __init__(self, i: int, cols: dict[str, list], flow: list[StageSpec], storage: StorageSpec, access: Access,
                 limits: LimitsSpec, lora_given: bool):
        first, kind = flow[0], KINDS[flow[0].kind]
        self.prompt = cols["prompt"][i] or ""
        self.image: np.ndarray | None = None
        self.mask: np.ndarray | None = None
        self.references: list[bytes] | None = None
        self.steps = first.steps if cols["steps"][i] is None else cols["steps"][i]
        self.width = first.width if cols["width"][i] is None else cols["width"][i]
        self.height = first.height if cols["height"][i] is None else cols["height"][i]
        # Longer prompts would only be truncated by the tokenizer; a prompt this long is a data bug.
        for name, text in (("prompt", self.prompt), ("negative_prompt", cols["negative_prompt"][i] or "")):
            if len(text) > limits.max_prompt_chars:
                raise InputError(f"{name}: {len(text)} characters, over limits.max_prompt_chars "
                                 f"{limits.max_prompt_chars}")
        if kind.prompt_required and not self.prompt.strip():
            raise InputError("prompt: empty")
        seed = cols["seed"][i]
        if seed is not None and _int64(seed) is None:
            raise InputError(f"seed: {seed} is outside the int64 range")
        if not 1 <= self.steps <= limits.max_steps:
            raise InputError(f"steps: {self.steps} is outside 1..{limits.max_steps} (limits.max_steps)")
        if kind.size_from == "image":
            self.image = decode("image", cols["image"][i], "RGB", storage, access, limits)
            self.height, self.width = self.image.shape[:2]
            if kind.name == "image_to_image":  # editing models take more images than one
                self.references = _references(cols["reference_images"][i], storage, access, limits)
        if kind.size_from == "model":  # the model's own size, known once it has made the image
            self.width = self.height = None
        else:
            problem = _size_problem(self.width, self.height, limits) or limits.flow_problem(flow, self.width,
                                                                                              self.height)
            if problem:
                raise InputError(f"{'image' if kind.size_from == 'image' else 'size'}: {problem}")
        if any("mask" in KINDS[stage.kind].inputs for stage in flow):
            self.mask = decode("mask", cols["mask"][i], "L", storage, access, limits)
            if self.mask.shape != (self.height, self.width):
                raise InputError(
                    f"mask: size {self.mask.shape[1]}x{self.mask.shape[0]} differs from the image's "
                    f"{self.width}x{self.height}"
                )
        self.conditioning = conditioning.row(cols, i, flow, lora_given, self.image, self.width, self.height, storage,
                                             access, limits)


def _references(value: list | None, storage: StorageSpec, access: Access, limits: LimitsSpec) -> list[bytes] | None:
    """A row's reference images, each read under the rules and limits of `image`, as PNG bytes."""
    if not value:
        return None
    if len(value) > MAX_REFERENCES:
        raise InputError(f"reference_images: {len(value)} images, over the {MAX_REFERENCES} an editing model takes")
    return [png_bytes(decode(f"reference_images[{k}]", v, "RGB", storage, access, limits)) for k, v in enumerate(value)]


def prepare_batch(table: pa.Table, flow: list[StageSpec], storage: StorageSpec, access: Access,
                  limits: LimitsSpec) -> pa.Table:
    first, kind = flow[0], KINDS[flow[0].kind]
    names = ("id", "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "strength", "width", "height",
             "image", "mask", "reference_images", *conditioning.manifest_names(flow))
    cols = {name: values(table, name) for name in names}
    rows, errors = [], []
    for i in range(table.num_rows):
        try:
            rows.append(_Row(i, cols, flow, storage, access, limits, "lora" in table.column_names))
            errors.append(None)
        except InputError as err:
            rows.append(None)
            errors.append(str(err))
    n = table.num_rows
    table = with_pixels(table, [r.image if r else None for r in rows])

    def override(name: str, cast) -> list:
        """The first stage's value where the row gives none and the kind takes it per row; the
        manifest's value (or null) where the kind does not."""
        default = getattr(first, name) if name in kind.overrides else None
        return [default if v is None else cast(v) for v in cols[name]]

    fill = [
        ("prompt", [p or "" for p in cols["prompt"]], pa.string()),
        ("negative_prompt", [p or "" for p in cols["negative_prompt"]], pa.string()),
        ("seed", _seeds(cols["id"], cols["seed"]), pa.int64()),
        ("steps", [r.steps if r else _int64(s) for r, s in zip(rows, cols["steps"])], pa.int64()),
        ("guidance_scale", override("guidance_scale", float), pa.float64()),
        ("strength", override("strength", float), pa.float64()),
        ("width", [r.width if r else _int64(w) for r, w in zip(rows, cols["width"])], pa.int64()),
        ("height", [r.height if r else _int64(h) for r, h in zip(rows, cols["height"])], pa.int64()),
        ("status", ["error" if e else "ok" for e in errors], pa.string()),
        ("error", errors, pa.string()),
        ("elapsed_s", [0.0] * n, pa.float64()),
        (columns.STAGES, [""] * n, pa.string()),
        (columns.STAGE_PARAMS, ["[]"] * n, pa.string()),
        (columns.MASK, [r.mask.tobytes() if r and r.mask is not None else None for r in rows], pa.binary()),
        (columns.REFERENCES, [r.references if r else None for r in rows], pa.list_(pa.binary())),
        *conditioning.filled(flow, [r.conditioning if r else None for r in rows], cols, set(table.column_names)),
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
        ("seed", _seeds(values(table, "id"), values(table, "seed")), pa.int64()),
        ("elapsed_s", [0.0] * n, pa.float64()),
        (columns.STAGES, [""] * n, pa.string()),
        (columns.STAGE_PARAMS, ["[]"] * n, pa.string()),
        (columns.PIXELS, [None] * n, pa.binary()),
    ]:
        table = with_column(table, name, vals, type_)
    return table
