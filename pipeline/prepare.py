"""CPU step before the GPU stages: fill per-row parameters and seeds, and turn row-level problems
into error rows (``status='error'`` with a message naming the field) while the rest go on."""

from __future__ import annotations

import hashlib

import pyarrow as pa

from pipeline import columns
from pipeline.spec import StageSpec
from pipeline.tables import values, with_column

PROMPTED_KINDS = {"text_to_image", "inpainting", "image_to_image"}


def derive_seed(row_id: str) -> int:
    """A row's default seed: a function of its id alone, stable across runs and machines."""
    return int.from_bytes(hashlib.sha256(row_id.encode("utf-8")).digest()[:8], "big") >> 1


def _row_problem(prompt: str, steps: int, width: int, height: int, needs_prompt: bool) -> str | None:
    if needs_prompt and not prompt.strip():
        return "prompt: empty"
    if not 1 <= steps <= 1000:
        return f"steps: {steps} is outside 1..1000"
    for name, size in (("width", width), ("height", height)):
        if size < 8 or size % 8:
            return f"{name}: {size} is not a positive multiple of 8"
    return None


def prepare_batch(table: pa.Table, first_stage: StageSpec) -> pa.Table:
    n = table.num_rows
    ids = values(table, "id")
    prompts = [p or "" for p in values(table, "prompt")]
    seeds = [derive_seed(i) if s is None else s for i, s in zip(ids, values(table, "seed"))]
    steps = [s or first_stage.steps for s in values(table, "steps")]
    guidance = [first_stage.guidance_scale if g is None else float(g) for g in values(table, "guidance_scale")]
    widths = [w or first_stage.width for w in values(table, "width")]
    heights = [h or first_stage.height for h in values(table, "height")]
    needs_prompt = first_stage.kind in PROMPTED_KINDS
    errors = [_row_problem(*args, needs_prompt) for args in zip(prompts, steps, widths, heights)]
    for name, vals, type_ in [
        ("prompt", prompts, pa.string()),
        ("negative_prompt", [p or "" for p in values(table, "negative_prompt")], pa.string()),
        ("seed", seeds, pa.int64()),
        ("steps", steps, pa.int64()),
        ("guidance_scale", guidance, pa.float64()),
        ("width", widths, pa.int64()),
        ("height", heights, pa.int64()),
        ("status", ["error" if e else "ok" for e in errors], pa.string()),
        ("error", errors, pa.string()),
        ("elapsed_s", [0.0] * n, pa.float64()),
        (columns.STAGES, [""] * n, pa.string()),
    ]:
        table = with_column(table, name, vals, type_)
    return table
