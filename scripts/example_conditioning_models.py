"""Write the random-weight conditioning models and the images that the conditioning examples in
examples/conditioning/ use, for the built-in shapes text-to-image model: a ControlNet (made from
its U-Net as diffusers' training starts one, its zero layers filled at random), an IP-Adapter and
a T2I-Adapter (tests/tiny_conditioning.py builds all three), each saved in half precision to keep
the repository small, and 32x32 shape scenes with their masks.

Random weights show the plumbing (a different control or reference image gives a different
image), not control: no shape follows its mask. Deterministic: rerunning rewrites the same files.

    .venv/bin/python -m scripts.example_conditioning_models    # from the repository root
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import load_file, save_file

from pipeline.models.resolve import build_builtin
from pipeline.training import data
from tests.tiny_conditioning import controlnet_for, ip_adapter_for, t2i_adapter_for

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "conditioning"
NAME = "shapes-random-demo"
SCENES = 4


def _half(folder: Path) -> None:
    """Every safetensors file under ``folder`` in half precision (loading casts it back)."""
    for path in folder.rglob("*.safetensors"):
        save_file({k: v.half() for k, v in load_file(path).items()}, path, metadata={"format": "pt"})


def models(model: Path) -> None:
    # Random output layers at the tests' spread (0.2) would swamp the trained model's image.
    controlnet_for(model, EXAMPLES / "controlnets" / NAME, spread=0.02)
    t2i_adapter_for(model, EXAMPLES / "t2i-adapters" / NAME)
    ip_adapter_for(model, EXAMPLES / "ip-adapters" / NAME)
    for kind in ("controlnets", "t2i-adapters", "ip-adapters"):
        _half(EXAMPLES / kind / NAME)


def images() -> None:
    """Shape scenes (the canny and image-to-image input, the reference images) and their masks
    (white on black: the ControlNet's and T2I-Adapter's control images), with their captions."""
    folder = EXAMPLES / "images"
    folder.mkdir(parents=True, exist_ok=True)
    captions = {}
    for k, scene in enumerate(data.sample_scenes(SCENES, seed=26)):
        Image.fromarray(data.render(scene)).save(folder / f"scene-{k}.png")
        mask = data.coverage(scene, data.LOW_RES, 4) > 0.5
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).convert("RGB").save(folder / f"mask-{k}.png")
        captions[f"scene-{k}"] = scene.caption
    (folder / "captions.json").write_text(json.dumps(captions, indent=1) + "\n")


if __name__ == "__main__":
    models(build_builtin("shapes-t2i"))
    images()
    for path in sorted(EXAMPLES.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(EXAMPLES.parent)}: {path.stat().st_size} bytes")
