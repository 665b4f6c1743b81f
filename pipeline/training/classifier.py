"""A tiny CNN that names the shape in an alpha map (measure.read's), for the evaluator.

It is trained on the procedural set with the same measuring step in front, on images degraded by
blur, corner rounding and noise, so that it reads shapes at the generators' effective resolution
(their latent cell is 4x4 pixels, and the VAE alone rounds corners), not only clean renders.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from pipeline.training import data, measure
from pipeline.training.distributed import Schedule

NAME = "shape-classifier"
SIZE = data.LOW_RES


@dataclass(frozen=True)
class ClassifierConfig:
    schedule: Schedule = field(default_factory=lambda: Schedule(steps=1500, batch_size=64, lr=2e-3, warmup=0, log_every=250))
    scenes: int = 6000
    seed: int = 1


class ShapeNet(torch.nn.Module):
    def __init__(self, classes: int = len(data.SHAPES)):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(64, classes)

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        # Global max pooling: a shape is recognised wherever it sits.
        return self.head(self.features(alpha).amax(dim=(2, 3)))


def _blur(alpha: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D float map (edges padded by repetition)."""
    if sigma < 0.05:
        return alpha
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(alpha, radius, mode="edge")
    rows = np.stack([np.convolve(r, kernel, mode="valid") for r in padded])
    return np.stack([np.convolve(c, kernel, mode="valid") for c in rows.T]).T


def _degraded_render(scene: data.Scene, rng: np.random.Generator) -> np.ndarray:
    """The scene with the flaws a small generator leaves, at random strengths: rounded corners
    (blur the coverage, then sharpen it again), soft edges, noise."""
    alpha = data.coverage(scene, SIZE)
    if rng.random() < 0.5:
        alpha = np.clip((_blur(alpha, rng.uniform(0.5, 1.5)) - 0.5) * rng.uniform(2.0, 4.0) + 0.5, 0.0, 1.0)
    alpha = _blur(alpha, rng.uniform(0.0, 1.0))[..., None]
    fg, bg = np.array(data.PALETTE[scene.colour], np.float32), np.array(data.PALETTE[scene.background], np.float32)
    image = alpha * fg + (1.0 - alpha) * bg + rng.normal(0.0, rng.uniform(0.0, 12.0), (SIZE, SIZE, 3))
    return np.clip(image, 0, 255).round().astype(np.uint8)


def alpha_maps(images: np.ndarray) -> np.ndarray:
    """N x H x W x 3 uint8 images to N x 1 x 32 x 32 alpha maps (resized when not 32x32)."""
    maps = []
    for image in images:
        alpha = measure.read(image).alpha
        if alpha.shape != (SIZE, SIZE):
            alpha = np.asarray(Image.fromarray(alpha).resize((SIZE, SIZE), Image.BILINEAR))
        maps.append(alpha)
    return np.stack(maps)[:, None].astype(np.float32)


def train(out: Path, config: ClassifierConfig = ClassifierConfig()) -> Path:
    """Plain single-process training: it takes a minute, Ray would only add start-up time."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    scenes = data.sample_scenes(config.scenes, seed=config.seed + 20_000)
    x = torch.from_numpy(alpha_maps(np.stack([_degraded_render(s, rng) for s in scenes])))
    y = torch.tensor([data.SHAPES.index(s.shape) for s in scenes])
    held_out = data.sample_scenes(1000, seed=config.seed + 30_000)
    hx = torch.from_numpy(alpha_maps(np.stack([_degraded_render(s, rng) for s in held_out])))
    hy = torch.tensor([data.SHAPES.index(s.shape) for s in held_out])

    s = config.schedule
    model = ShapeNet()
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=s.steps)
    generator = torch.Generator().manual_seed(config.seed)
    for step in range(1, s.steps + 1):
        idx = torch.randint(len(x), (s.batch_size,), generator=generator)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % s.log_every == 0:
            print(f"step {step}/{s.steps}  loss {loss.item():.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        accuracy = (model(hx).argmax(1) == hy).float().mean().item()
    print(f"{NAME}: held-out accuracy {accuracy:.1%} on {len(hy)} degraded renders", flush=True)
    dest = out / NAME
    dest.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(dest / "model.safetensors"))
    (dest / "config.json").write_text(json.dumps({"shapes": list(data.SHAPES), "held_out_accuracy": accuracy, **asdict(config)}, indent=2))
    return dest


class ShapeClassifier:
    """The trained classifier: ``predict(images)`` names the shape in each image."""

    def __init__(self, folder: Path):
        self.shapes = json.loads((folder / "config.json").read_text())["shapes"]
        self.model = ShapeNet(len(self.shapes))
        self.model.load_state_dict(load_file(str(folder / "model.safetensors")))
        self.model.eval()

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """N x shapes: how sure the classifier is of each shape (columns in ``self.shapes``' order)."""
        return torch.softmax(self.model(torch.from_numpy(alpha_maps(images))), dim=1).numpy()

    def predict(self, images: np.ndarray) -> list[str]:
        return [self.shapes[i] for i in self.probabilities(images).argmax(1).tolist()]
