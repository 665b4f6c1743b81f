"""The shared AutoencoderKL: trained first, on 32x32 scenes and 32x32 crops of 128x128 scenes.

Simple flat shapes make a small VAE enough. It is trained as an autoencoder with a very light KL
term (as Stable Diffusion's is), then its latent space is standardised (see ``standardise``).
Some training images carry a grey box, the "masked image" the inpainting pipeline encodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from pipeline.training import architectures, data
from pipeline.training.distributed import Cluster, Schedule, Worker, fit

NAME = "shapes-vae"


@dataclass(frozen=True)
class VAEConfig:
    schedule: Schedule = field(default_factory=lambda: Schedule(steps=1500, batch_size=32, lr=1e-3, warmup=50, ema_decay=0.995))
    scenes: int = 8000
    hr_scenes: int = 1000
    kl_weight: float = 1e-6
    # Share of training images with a random grey box (what the inpainting pipeline encodes).
    masked_share: float = 0.2


class _Autoencode(torch.nn.Module):
    """One forward for DDP: encode, sample with the caller's noise, decode."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor):
        moments = self.vae.quant_conv(self.vae.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * eps
        return self.vae.decode(z).sample, mean, logvar


def _random_crops(images: torch.Tensor, size: int, worker: Worker) -> torch.Tensor:
    n, _, h, w = images.shape
    tops = torch.randint(h - size + 1, (n,), generator=worker.generator)
    lefts = torch.randint(w - size + 1, (n,), generator=worker.generator)
    return torch.stack([img[:, t : t + size, l : l + size] for img, t, l in zip(images, tops, lefts)])


def _grey_boxes(x: torch.Tensor, share: float, worker: Worker) -> torch.Tensor:
    x = x.clone()
    n, _, h, w = x.shape
    for i in torch.nonzero(torch.rand(n, generator=worker.generator) < share).flatten():
        top, left = (int(v) for v in torch.randint(h - 8, (2,), generator=worker.generator))
        bh, bw = (int(v) for v in torch.randint(8, h // 2 + 1, (2,), generator=worker.generator))
        x[i, :, top : top + bh, left : left + bw] = 0.0  # 0 in [-1, 1]: the pipeline's masked pixels
    return x


def _loop(config: dict) -> None:
    worker = Worker(config)
    seed = worker.schedule.seed
    low = torch.from_numpy(data.to_tensor_range(data.render_all(worker.shard(data.sample_scenes(config["scenes"], seed)), data.LOW_RES)))
    high = torch.from_numpy(
        data.to_tensor_range(data.render_all(worker.shard(data.sample_scenes(config["hr_scenes"], seed + 1)), data.HIGH_RES))
    )
    model = _Autoencode(architectures.vae())

    def loss_fn(ddp) -> torch.Tensor:
        half = worker.schedule.batch_size // 2
        x = torch.cat([low[worker.batch_indices(len(low))[:half]], _random_crops(high[worker.batch_indices(len(high))[half:]], data.LOW_RES, worker)])
        x = _grey_boxes(x, config["masked_share"], worker).to(worker.device)
        recon, mean, logvar = ddp(x, worker.randn(x.shape[0], architectures.LATENT_CHANNELS, x.shape[2] // 4, x.shape[3] // 4))
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return F.mse_loss(recon, x) + F.l1_loss(recon, x) + config["kl_weight"] * kl

    result = worker.train(model, loss_fn)
    worker.finish({"vae": {k.removeprefix("vae."): v for k, v in result["ema"].items()}, "losses": result["losses"]})


@torch.no_grad()
def standardise(vae: AutoencoderKL, images: torch.Tensor) -> None:
    """Shift and scale each latent channel (inside quant_conv / post_quant_conv, so the decoded
    images do not change) to mean 0 and standard deviation 1 / scaling_factor: the pipelines
    multiply latents by scaling_factor, so the diffusion models then see unit-variance latents."""
    mean = vae.encode(images).latent_dist.mean
    mu = mean.mean(dim=(0, 2, 3))
    k = (1.0 / vae.config.scaling_factor) / mean.std(dim=(0, 2, 3))
    c = architectures.LATENT_CHANNELS
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] *= k[:, None, None, None]
    q.bias[:c] = k * (q.bias[:c] - mu)
    q.bias[c:] += 2.0 * torch.log(k)  # the log-variance of a k-times larger latent
    p.bias += p.weight[:, :, 0, 0] @ mu
    p.weight /= k[None, :, None, None]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 image arrays."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(data.to_tensor_range(images))
    out = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def train(out: Path, cluster: Cluster, config: VAEConfig = VAEConfig()) -> Path:
    payload = fit(_loop, {**config.__dict__, "schedule": config.schedule.to_dict()}, cluster, NAME)
    vae = architectures.vae()
    vae.load_state_dict(payload["vae"])
    vae.eval()
    held_out = data.sample_scenes(256, seed=10_000)
    standardise(vae, torch.from_numpy(data.to_tensor_range(data.render_all(held_out, data.LOW_RES))))
    low, high = data.render_all(held_out, data.LOW_RES), data.render_all(held_out[:32], data.HIGH_RES)
    print(f"{NAME}: reconstruction PSNR {psnr(reconstruct(vae, low), low):.2f} dB at 32x32, "
          f"{psnr(reconstruct(vae, high), high):.2f} dB at 128x128 (held-out scenes)", flush=True)
    dest = out / NAME
    vae.save_pretrained(dest, safe_serialization=True)
    return dest
