"""CPU step before the GPU stages: fill per-row parameters and seeds, and turn row-level problems
into error rows (``status='error'`` with a message naming the field) while the rest go on."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from pipeline import columns
from pipeline.spec import StageSpec

PROMPTED_KINDS = {"text_to_image", "inpainting", "image_to_image"}


def derive_seed(row_id: str) -> int:
    """A row's default seed: a function of its id alone, stable across runs and machines."""
    return int.from_bytes(hashlib.sha256(row_id.encode("utf-8")).digest()[:8], "big") >> 1


def _value(batch: dict[str, np.ndarray], name: str, i: int) -> Any:
    if name not in batch:
        return None
    v = batch[name][i]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if isinstance(v, np.generic) else v


def _row_problem(prompt: str, steps: int, width: int, height: int, needs_prompt: bool) -> str | None:
    if needs_prompt and not prompt.strip():
        return "prompt: empty"
    if not 1 <= steps <= 1000:
        return f"steps: {steps} is outside 1..1000"
    for name, size in (("width", width), ("height", height)):
        if size < 8 or size % 8:
            return f"{name}: {size} is not a positive multiple of 8"
    return None


def prepare_batch(batch: dict[str, np.ndarray], first_stage: StageSpec) -> dict[str, np.ndarray]:
    n = len(batch["id"])
    out: dict[str, list] = {k: [] for k in (
        "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "status", "error"
    )}
    needs_prompt = first_stage.kind in PROMPTED_KINDS
    for i in range(n):
        row_id = str(batch["id"][i])
        prompt = _value(batch, "prompt", i) or ""
        seed = _value(batch, "seed", i)
        steps = int(_value(batch, "steps", i) or first_stage.steps)
        guidance = _value(batch, "guidance_scale", i)
        width = int(_value(batch, "width", i) or first_stage.width)
        height = int(_value(batch, "height", i) or first_stage.height)
        problem = _row_problem(prompt, steps, width, height, needs_prompt)
        out["prompt"].append(prompt)
        out["negative_prompt"].append(_value(batch, "negative_prompt", i) or "")
        out["seed"].append(derive_seed(row_id) if seed is None else int(seed))
        out["steps"].append(steps)
        out["guidance_scale"].append(first_stage.guidance_scale if guidance is None else float(guidance))
        out["width"].append(width)
        out["height"].append(height)
        out["status"].append("error" if problem else "ok")
        out["error"].append(problem)
    batch.update({
        "prompt": np.array(out["prompt"], dtype=object),
        "negative_prompt": np.array(out["negative_prompt"], dtype=object),
        "seed": np.array(out["seed"], dtype=np.int64),
        "steps": np.array(out["steps"], dtype=np.int64),
        "guidance_scale": np.array(out["guidance_scale"], dtype=np.float64),
        "width": np.array(out["width"], dtype=np.int64),
        "height": np.array(out["height"], dtype=np.int64),
        "status": np.array(out["status"], dtype=object),
        "error": np.array(out["error"], dtype=object),
        "elapsed_s": np.zeros(n, dtype=np.float64),
        columns.STAGES: np.array([""] * n, dtype=object),
    })
    return batch
