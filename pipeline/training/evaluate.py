"""Prompt adherence and fidelity of the shapes models, measured from pixels (no downloads).

- text-to-image: colour accuracy (nearest palette colour of the foreground) and shape accuracy
  (classifier.py on the foreground's alpha map) against the prompt's colour and shape;
- super-resolution: PSNR against the true 128x128 render, next to bicubic upsampling's;
- inpainting: mean change of the pixels outside the mask (in 1/255 units), and whether the
  repainted region has the prompted colour.

``python -m pipeline.training eval`` prints all of them; ``score_images`` measures any batch of
generated images against their scenes, the inpainting stage's ``keep_unmasked`` (pipeline/images.py) is applied as the stage does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from PIL import Image

from pipeline.images import keep_unmasked
from pipeline.training import data, measure
from pipeline.training.classifier import NAME as CLASSIFIER_NAME
from pipeline.training.classifier import ShapeClassifier
from pipeline.training.vae import psnr

HELD_OUT_SEED = 50_000  # training scenes use seeds < 50_000
SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm-solver": DPMSolverMultistepScheduler}
# Super-resolution settings (sampler, steps, noise level) that ``sr_figures`` measures; the first
# is the stages' default. One DDIM step from t = 999 returns the model's estimate of the mean
# image given the low-res input and caption (the PSNR-optimal answer); more steps move towards a
# sharp sample of the distribution, whose PSNR is lower wherever the model is unsure.
SR_SETTINGS = (
    ("dpm-solver", 20, 20), ("dpm-solver", 20, 0), ("ddim", 20, 20), ("ddim", 50, 20), ("ddim", 1, 20), ("ddim", 2, 20),
)


@dataclass(frozen=True)
class Scores:
    colour: float
    shape: float
    background: float
    n: int


def score_images(images: np.ndarray, scenes: list[data.Scene], classifier: ShapeClassifier) -> Scores:
    """The share of images whose measured colour, shape and background match their scene's."""
    readings = [measure.read(image) for image in images]
    shapes = classifier.predict(images)
    return Scores(
        colour=float(np.mean([r.colour == s.colour for r, s in zip(readings, scenes)])),
        shape=float(np.mean([p == s.shape for p, s in zip(shapes, scenes)])),
        background=float(np.mean([r.background == s.background for r, s in zip(readings, scenes)])),
        n=len(scenes),
    )


def _load(folder: Path, sampler: str, device: str = "cpu") -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True).to(device)
    pipe.scheduler = SAMPLERS[sampler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe: DiffusionPipeline, n: int, chunk: int, inputs: Callable[[slice], dict[str, Any]],
              **settings: Any) -> np.ndarray:
    """Run ``pipe`` over n cases, ``chunk`` at a time, as uint8 images. ``inputs(part)`` gives the
    per-case arguments of the cases in ``part``; case i has its own CPU generator seeded
    HELD_OUT_SEED + i, so a GPU run draws the same initial noise and chunking changes nothing."""
    images = []
    for start in range(0, n, chunk):
        part = slice(start, min(n, start + chunk))
        generators = [torch.Generator().manual_seed(HELD_OUT_SEED + i) for i in range(part.start, part.stop)]
        out = pipe(**inputs(part), **settings, generator=generators, output_type="np")
        images.append((np.asarray(out.images) * 255).round().astype(np.uint8))
    return np.concatenate(images)


def text_to_image(folder: Path, classifier: ShapeClassifier, n: int, sampler: str, steps: int, guidance: float) -> Scores:
    pipe = _load(folder, sampler)
    scenes = data.sample_scenes(n, HELD_OUT_SEED)
    images = _generate(pipe, n, 50, lambda part: {"prompt": [s.caption for s in scenes[part]]},
                       num_inference_steps=steps, guidance_scale=guidance)
    return score_images(images, scenes, classifier)


def super_resolution(
    folder: Path, n: int, steps: int, noise_level: int, guidance: float, sampler: str = "dpm-solver", device: str = "cpu", chunk: int = 25
) -> dict[str, float]:
    """Mean PSNR of the upscaled held-out scenes and of their bicubic upsampling against the true
    128x128 renders. The generators stay on the CPU, so a GPU run draws the same initial noise."""
    pipe = _load(folder, sampler, device)
    scenes = data.sample_scenes(n, HELD_OUT_SEED + 1)
    low, high = data.render_all(scenes, data.LOW_RES), data.render_all(scenes, data.HIGH_RES)
    bicubic = np.stack([np.asarray(Image.fromarray(im).resize((data.HIGH_RES,) * 2, Image.BICUBIC)) for im in low])
    upscaled = _generate(
        pipe, n, chunk,
        lambda part: {"prompt": [s.caption for s in scenes[part]], "image": [Image.fromarray(im) for im in low[part]]},
        num_inference_steps=steps, noise_level=noise_level, guidance_scale=guidance,
    )
    model_psnr = float(np.mean([psnr(u, h) for u, h in zip(upscaled, high)]))
    bicubic_psnr = float(np.mean([psnr(b, h) for b, h in zip(bicubic, high)]))
    return {"psnr": model_psnr, "bicubic_psnr": bicubic_psnr, "gain_db": model_psnr - bicubic_psnr, "n": n}


def inpaint_cases(n: int, seed: int = HELD_OUT_SEED + 2):
    """Scenes, a box mask around each shape (whole 4-pixel latent cells), and a prompt asking for
    the same shape in another colour (neither the old colour nor the background's)."""
    rng = np.random.default_rng(seed)
    cases = []
    for scene in data.sample_scenes(n, seed):
        others = [c for c in data.COLOURS if c not in (scene.colour, scene.background)]
        colour = others[rng.integers(len(others))]
        mask = data.box_mask(data.shape_box(scene, data.LOW_RES, align=4), data.LOW_RES)
        cases.append((scene, mask, colour))
    return cases


def inpainting(folder: Path, classifier: ShapeClassifier, n: int, steps: int, guidance: float) -> dict[str, float]:
    pipe = _load(folder, "dpm-solver")
    cases = inpaint_cases(n)
    originals = data.render_all([c[0] for c in cases], data.LOW_RES)
    generated = _generate(
        pipe, n, 50,
        lambda part: {
            "prompt": [data.caption(s.shape, colour, s.background) for s, _, colour in cases[part]],
            "image": [Image.fromarray(im) for im in originals[part]],
            "mask_image": [Image.fromarray((m * 255).astype(np.uint8)) for _, m, _ in cases[part]],
        },
        height=data.LOW_RES, width=data.LOW_RES, num_inference_steps=steps, guidance_scale=guidance,
    )
    outside_raw, outside_pasted, colour_ok, pasted_all = [], [], [], []
    for (scene, mask, colour), original, image in zip(cases, originals, generated):
        keep = mask < 0.5
        pasted = keep_unmasked(original, image, (mask * 255).astype(np.uint8))
        pasted_all.append(pasted)
        outside_raw.append(np.abs(image.astype(np.int16) - original)[keep].mean())
        outside_pasted.append(np.abs(pasted.astype(np.int16) - original)[keep].mean())
        reading = measure.read(pasted, region=~keep, background=np.array(data.PALETTE[scene.background], np.float32))
        colour_ok.append(reading.colour == colour)
    shapes = classifier.predict(np.stack(pasted_all))
    return {
        "outside_change_raw_255": float(np.mean(outside_raw)),
        "outside_change_pasted_255": float(np.mean(outside_pasted)),
        "colour_accuracy": float(np.mean(colour_ok)),
        "shape_accuracy": float(np.mean([p == s.shape for p, (s, _, _) in zip(shapes, cases)])),
        "n": n,
    }


def main(models: Path, images: int | None = None) -> dict:
    """Print and return every figure of the acceptance criteria (``images`` shrinks the counts)."""
    classifier = ShapeClassifier(models / CLASSIFIER_NAME)
    figures: dict = {}

    def run(name: str, fn, *args):
        start = time.time()
        figures[name] = fn(*args)
        value = figures[name].__dict__ if isinstance(figures[name], Scores) else figures[name]
        print(f"{name}: {json.dumps(value)}  ({time.time() - start:.0f}s)", flush=True)

    t2i = models / "shapes-t2i"
    if t2i.exists():
        n = images or 200
        run("t2i dpm-solver 20 steps, guidance 4", text_to_image, t2i, classifier, n, "dpm-solver", 20, 4.0)
        run("t2i ddim 50 steps, guidance 4", text_to_image, t2i, classifier, n, "ddim", 50, 4.0)
        run("t2i ddpm 1000 steps, guidance 4", text_to_image, t2i, classifier, images or 100, "ddpm", 1000, 4.0)
    if (models / "shapes-sr").exists():
        run("sr dpm-solver 20 steps, noise level 20", super_resolution, models / "shapes-sr", images or 100, 20, 20, 1.0)
    if (models / "shapes-inpaint").exists():
        run("inpaint dpm-solver 20 steps, guidance 4", inpainting, models / "shapes-inpaint", classifier, images or 100, 20, 4.0)
    return figures


def sr_figures(folders: list[Path], n: int, device: str, json_path: Path | None = None) -> list[dict]:
    """PSNR against bicubic for each super-resolution model folder at each of ``SR_SETTINGS``,
    printed as a table (and written to ``json_path``)."""
    rows = []
    for folder in folders:
        for sampler, steps, noise_level in SR_SETTINGS:
            start = time.time()
            figures = super_resolution(folder, n, steps, noise_level, 1.0, sampler=sampler, device=device, chunk=100)
            rows.append({"model": str(folder), "sampler": sampler, "steps": steps, "noise_level": noise_level, **figures, "seconds": time.time() - start})
    if json_path is not None:
        json_path.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{'model':<40} {'sampler':<11} {'steps':>5} {'noise':>5} {'PSNR':>7} {'bicubic':>7} {'gain':>6}  (dB, {n} held-out scenes)")
    for r in rows:
        print(f"{r['model'][-40:]:<40} {r['sampler']:<11} {r['steps']:>5} {r['noise_level']:>5} {r['psnr']:>7.2f} {r['bicubic_psnr']:>7.2f} {r['gain_db']:>+6.2f}")
    return rows
