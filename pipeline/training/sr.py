"""x4 super-resolution: a latent DDPM whose latents (the 128x128 render's, 32x32x4) sit at the
low-res size, conditioned on the noised 32x32 render concatenated as 3 channels and on the noise
level as a class label; saved as a StableDiffusionUpscalePipeline.

Training uses aligned 16x16 crops of latents and low-res image (the task is local, and small crops
are cheap); the model runs on any size, 32x32 latents at evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionUpscalePipeline
from transformers import CLIPTextModel

from pipeline.training import architectures, data
from pipeline.training.distributed import Cluster, Schedule, Worker, fit
from pipeline.training.latents import Denoiser, ddpm_loss, drop_captions, posterior, sample_latents, split_denoiser, token_ids, vae_from_payload, vae_payload
from pipeline.training.t2i import NAME as T2I_NAME
from pipeline.training.vae import NAME as VAE_NAME

NAME = "shapes-sr"


@dataclass(frozen=True)
class SRConfig:
    schedule: Schedule = field(default_factory=lambda: Schedule(steps=1500, batch_size=32, lr=1e-3, warmup=100, ema_decay=0.999, log_every=100))
    scenes: int = 3000
    crop: int = 16  # in low-res (= latent) pixels
    uncond_share: float = 0.1
    # Half the steps see noise levels up to this (the stages' default is 20), half the full range.
    low_noise_level: int = 100


def _noise_levels(n: int, low: int, worker: Worker) -> torch.Tensor:
    cap = torch.where(torch.rand(n, generator=worker.generator) < 0.5, low, architectures.MAX_NOISE_LEVEL)
    return (torch.rand(n, generator=worker.generator) * (cap + 1)).long()


def _loop(config: dict) -> None:
    worker = Worker(config)
    scenes = worker.shard(data.sample_scenes(config["scenes"], worker.schedule.seed + 2))
    mean, std = posterior(vae_from_payload(config["vae"]), data.render_all(scenes, data.HIGH_RES), chunk=32)
    low = torch.from_numpy(data.to_tensor_range(data.render_all(scenes, data.LOW_RES)))
    tokenizer = architectures.tokenizer()
    ids, empty = token_ids(tokenizer, [s.caption for s in scenes]), token_ids(tokenizer, [""])
    model = Denoiser(architectures.sr_unet(), architectures.text_encoder(tokenizer))
    model.text_encoder.load_state_dict(config["text_encoder"])
    scheduler, low_res_scheduler = architectures.noise_scheduler(), architectures.low_res_scheduler()
    crop = config["crop"]

    def loss_fn(ddp):
        idx = worker.batch_indices(len(mean))
        corners = torch.randint(data.LOW_RES - crop + 1, (len(idx), 2), generator=worker.generator).tolist()
        window = lambda t: torch.stack([t[i, :, y : y + crop, x : x + crop] for i, (y, x) in zip(idx.tolist(), corners)])  # noqa: E731
        z0 = sample_latents(window(mean), window(std), worker)
        levels = _noise_levels(len(idx), config["low_noise_level"], worker)
        noisy_low = low_res_scheduler.add_noise(window(low), torch.randn(len(idx), 3, crop, crop, generator=worker.generator), levels)
        return ddpm_loss(
            ddp, scheduler, z0, drop_captions(ids[idx], empty, config["uncond_share"], worker), worker,
            condition=noisy_low.to(worker.device), class_labels=levels.to(worker.device),
        )

    worker.finish(worker.train(model, loss_fn))


def assemble(vae: AutoencoderKL, state: dict) -> StableDiffusionUpscalePipeline:
    tokenizer = architectures.tokenizer()
    unet, text_encoder = architectures.sr_unet(), architectures.text_encoder(tokenizer)
    split_denoiser(state, unet, text_encoder)
    return StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=architectures.low_res_scheduler(),
        scheduler=DPMSolverMultistepScheduler.from_config(architectures.noise_scheduler().config),
        max_noise_level=architectures.MAX_NOISE_LEVEL,
    )


def train(out: Path, cluster: Cluster, config: SRConfig = SRConfig()) -> Path:
    vae = AutoencoderKL.from_pretrained(out / VAE_NAME)
    # The caption encoder starts from the text-to-image model's (it already tells captions apart).
    text_encoder = CLIPTextModel.from_pretrained(out / T2I_NAME / "text_encoder")
    config_dict = {**config.__dict__, "schedule": config.schedule.to_dict(), "vae": vae_payload(vae), "text_encoder": text_encoder.state_dict()}
    payload = fit(_loop, config_dict, cluster, NAME)
    dest = out / NAME
    assemble(vae, payload["ema"]).save_pretrained(dest, safe_serialization=True)
    return dest
