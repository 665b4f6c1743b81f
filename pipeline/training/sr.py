"""x4 super-resolution: a latent DDPM whose latents (the 128x128 render's, 32x32x4) sit at the
low-res size, conditioned on the noised 32x32 render concatenated as 3 channels and on the noise
level as a class label; saved as a StableDiffusionUpscalePipeline.

Training uses aligned 16x16 crops of latents and low-res image (the task is local, and small crops
are cheap); the model runs on any size, 32x32 latents at evaluation.

The pipeline's VAE decoder is first fine-tuned on 128x128 renders (``train_decoder``, saved as
shapes-sr-vae; the encoder, and so the latent space, stays the shared VAE's): the upscaler can be
no sharper than its decoder, and the shared VAE is mostly trained at 32x32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionUpscalePipeline
from transformers import CLIPTextModel

from pipeline.training import architectures, data
from pipeline.training.captions import CaptionSampler
from pipeline.training.distributed import Cluster, Schedule, Worker, fit
from pipeline.training.latents import (
    Denoiser,
    ddpm_loss,
    pipeline_parts,
    posterior,
    sample_latents,
    vae_from_payload,
    vae_payload,
)
from pipeline.training.t2i import NAME as T2I_NAME
from pipeline.training.vae import NAME as VAE_NAME

NAME = "shapes-sr"
DECODER_NAME = "shapes-sr-vae"
# Velocity, not noise: with the noise as target, the upscaler's estimate of x_0 at the first,
# noisiest steps is the small noise error divided by sqrt(alpha_bar) ~ 0.006, and sampling
# diverged (PSNR 8 dB, first run). The real x4 upscaler predicts v for the same reason.
PREDICTION = "v_prediction"


@dataclass(frozen=True)
class SRConfig:
    schedule: Schedule = field(default_factory=lambda: Schedule(steps=1500, batch_size=32, lr=1e-3, warmup=100, ema_decay=0.999, log_every=100))
    scenes: int = 3000
    crop: int = 16  # in low-res (= latent) pixels
    uncond_share: float = 0.1
    template_share: float = 0.3
    # Half the steps see noise levels up to this (the stages' default is 20), half the full range.
    low_noise_level: int = 100
    decoder: Schedule = field(default_factory=lambda: Schedule(steps=600, batch_size=16, lr=5e-4, warmup=20, ema_decay=0.99, log_every=100))
    decoder_crop: int = 64  # in high-res pixels


class _Decode(torch.nn.Module):
    """The decoding half of the VAE, as one module for DDP."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def _window(tensor: torch.Tensor, idx: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """``tensor[i, :, y : y + size, x : x + size]`` for each index i and corner (y, x), gathered in
    one indexing operation (on a GPU, a Python loop over the batch would cost more than the step)."""
    idx, corners = idx.to(tensor.device), corners.to(tensor.device)
    offsets = torch.arange(size, device=tensor.device)
    rows = (corners[:, 0, None] + offsets)[:, :, None]
    cols = (corners[:, 1, None] + offsets)[:, None, :]
    return tensor[idx[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def _aligned_crops(idx: torch.Tensor, crop: int, worker: Worker, latents: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """The same random window of ``latents`` and of each of ``others`` (at their own scale, a
    multiple of the latents' size)."""
    corners = torch.randint(latents.shape[-1] - crop + 1, (len(idx), 2), generator=worker.generator)
    crops = [_window(latents, idx, corners, crop)]
    for other in others:
        scale = other.shape[-1] // latents.shape[-1]
        crops.append(_window(other, idx, corners * scale, crop * scale))
    return crops


def _decoder_loop(config: dict) -> None:
    worker = Worker(config)
    scenes = worker.shard(data.sample_scenes(config["scenes"], worker.schedule.seed + 2))
    high = torch.from_numpy(data.to_tensor_range(data.render_all(scenes, data.HIGH_RES)))
    vae = vae_from_payload(config["vae"])
    mean, std = posterior(vae, high, chunk=32)
    model = _Decode(vae).requires_grad_(True)
    crop = config["decoder_crop"] // (data.HIGH_RES // data.LOW_RES)

    def loss_fn(ddp):
        idx = worker.batch_indices(len(mean))
        z_mean, z_std, x = _aligned_crops(idx, crop, worker, mean, std, high)
        recon = ddp((z_mean + z_std * worker.randn(*z_mean.shape)).to(worker.device))
        target = x.to(worker.device)
        return F.mse_loss(recon, target) + F.l1_loss(recon, target)

    worker.finish(worker.train(model, loss_fn))


def _noise_levels(n: int, low: int, worker: Worker) -> torch.Tensor:
    cap = torch.where(torch.rand(n, generator=worker.generator) < 0.5, low, architectures.MAX_NOISE_LEVEL)
    return (torch.rand(n, generator=worker.generator) * (cap + 1)).long()


class TrainingSet:
    """This worker's scenes, their 128x128 renders' latent posterior (``mean``, ``std``) and their
    32x32 renders in [-1, 1] (``low``). The whole (small) set lives on the worker's device; crops are
    gathered there."""

    def __init__(self, config: dict, worker: Worker):
        self.crop, self.low_noise_level, self.worker = config["crop"], config["low_noise_level"], worker
        self.scenes = worker.shard(data.sample_scenes(config["scenes"], worker.schedule.seed + 2))
        vae = vae_from_payload(config["vae"]).to(worker.device)
        self.mean, self.std = posterior(vae, data.render_all(self.scenes, data.HIGH_RES), chunk=32)
        self.low = torch.from_numpy(data.to_tensor_range(data.render_all(self.scenes, data.LOW_RES))).to(worker.device)
        self.low_res_scheduler = architectures.low_res_scheduler()

    def draw(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the scenes ``idx``: a latent sample (aligned ``crop``), the low-res crop noised at a
        random level as the pipeline noises it, and that level (the U-Net's class label)."""
        worker, crop = self.worker, self.crop
        z_mean, z_std, low_crop = _aligned_crops(idx, crop, worker, self.mean, self.std, self.low)
        z0 = sample_latents(z_mean, z_std, worker)
        levels = _noise_levels(len(idx), self.low_noise_level, worker).to(worker.device)
        noisy_low = self.low_res_scheduler.add_noise(low_crop, worker.randn(len(idx), 3, crop, crop), levels)
        return z0, noisy_low, levels


def _loop(config: dict) -> None:
    worker = Worker(config)
    batches = TrainingSet(config, worker)
    tokenizer = architectures.tokenizer()
    captions = CaptionSampler(tokenizer, batches.scenes, config["template_share"], config["uncond_share"])
    model = Denoiser(architectures.sr_unet(), architectures.text_encoder(tokenizer))
    if config["init"] is not None:
        model.load_state_dict(config["init"])
    else:
        model.text_encoder.load_state_dict(config["text_encoder"])
    scheduler = architectures.noise_scheduler(PREDICTION)

    def loss_fn(ddp):
        idx = worker.batch_indices(len(batches.scenes))
        z0, noisy_low, levels = batches.draw(idx)
        return ddpm_loss(
            ddp, scheduler, z0, captions(idx, worker.generator), worker,
            condition=noisy_low, class_labels=levels,
        )

    worker.finish(worker.train(model, loss_fn))


def assemble(vae: AutoencoderKL, state: dict) -> StableDiffusionUpscalePipeline:
    return StableDiffusionUpscalePipeline(
        vae=vae,
        **pipeline_parts(state, architectures.sr_unet(), PREDICTION),
        low_res_scheduler=architectures.low_res_scheduler(),
        max_noise_level=architectures.MAX_NOISE_LEVEL,
    )


def train_decoder(out: Path, cluster: Cluster, config: SRConfig = SRConfig()) -> Path:
    """The shared VAE with its decoder fine-tuned at 128x128, saved as ``out``/shapes-sr-vae."""
    vae = AutoencoderKL.from_pretrained(out / VAE_NAME)
    decoder = fit(_decoder_loop, {**config.__dict__, "schedule": config.decoder.to_dict(), "vae": vae_payload(vae)}, cluster, DECODER_NAME)
    _Decode(vae).load_state_dict(decoder["ema"])
    dest = out / DECODER_NAME
    vae.save_pretrained(dest, safe_serialization=True)
    return dest


def train(out: Path, cluster: Cluster, config: SRConfig = SRConfig(), resume: bool = False) -> Path:
    """Train into ``out``/shapes-sr; ``resume`` starts from the model saved there."""
    vae = AutoencoderKL.from_pretrained(out / DECODER_NAME)
    # The caption encoder starts from the text-to-image model's (it already tells captions apart).
    text_encoder = CLIPTextModel.from_pretrained(out / T2I_NAME / "text_encoder")
    init = None
    if resume:
        saved = StableDiffusionUpscalePipeline.from_pretrained(out / NAME, use_safetensors=True, local_files_only=True)
        init = Denoiser(saved.unet, saved.text_encoder).state_dict()
    config_dict = {
        **config.__dict__,
        "schedule": config.schedule.to_dict(),
        "vae": vae_payload(vae),
        "text_encoder": text_encoder.state_dict(),
        "init": init,
    }
    payload = fit(_loop, config_dict, cluster, NAME)
    dest = out / NAME
    assemble(vae, payload["ema"]).save_pretrained(dest, safe_serialization=True)
    return dest
