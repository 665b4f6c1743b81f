"""Text-to-image: a latent DDPM over 8x8x4 latents of the 32x32 scenes, conditioned on the caption
(U-Net and text encoder trained together) in many phrasings (captions.py), saved as a
StableDiffusionPipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffusers import AutoencoderKL, StableDiffusionPipeline

from pipeline.training import architectures, data
from pipeline.training.captions import CaptionSampler
from pipeline.training.distributed import Cluster, Schedule, Worker, fit
from pipeline.training.latents import (
    NO_SAFETY_CHECKER,
    Denoiser,
    ddpm_loss,
    pipeline_parts,
    posterior,
    sample_latents,
    vae_from_payload,
    vae_payload,
)
from pipeline.training.vae import NAME as VAE_NAME

NAME = "shapes-t2i"


@dataclass(frozen=True)
class T2IConfig:
    schedule: Schedule = field(default_factory=lambda: Schedule(steps=2500, batch_size=64, lr=1e-3, warmup=100, ema_decay=0.999, log_every=100))
    scenes: int = 16000
    # Classifier-free guidance: the share of steps trained on the empty caption.
    uncond_share: float = 0.1
    # The rest: the original caption template this often, else another training phrasing.
    template_share: float = 0.3


def _loop(config: dict) -> None:
    worker = Worker(config)
    scenes = worker.shard(data.sample_scenes(config["scenes"], worker.schedule.seed))
    mean, std = posterior(vae_from_payload(config["vae"]), data.render_all(scenes, data.LOW_RES))
    tokenizer = architectures.tokenizer()
    captions = CaptionSampler(tokenizer, scenes, config["template_share"], config["uncond_share"])
    model = Denoiser(architectures.t2i_unet(), architectures.text_encoder(tokenizer))
    if config["init"] is not None:
        model.load_state_dict(config["init"])
    scheduler = architectures.noise_scheduler()

    def loss_fn(ddp):
        idx = worker.batch_indices(len(mean))
        z0 = sample_latents(mean[idx], std[idx], worker)
        return ddpm_loss(ddp, scheduler, z0, captions(idx, worker.generator), worker)

    result = worker.train(model, loss_fn)
    worker.finish(result)


def assemble(vae: AutoencoderKL, state: dict) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(vae=vae, **pipeline_parts(state, architectures.t2i_unet()), **NO_SAFETY_CHECKER)


def train(out: Path, cluster: Cluster, config: T2IConfig = T2IConfig(), resume: bool = False) -> Path:
    """Train into ``out``/shapes-t2i; ``resume`` starts from the model saved there (another
    warm-up and cosine decay) instead of from random weights."""
    vae = AutoencoderKL.from_pretrained(out / VAE_NAME)
    init = None
    if resume:
        saved = StableDiffusionPipeline.from_pretrained(out / NAME, use_safetensors=True, local_files_only=True)
        init = Denoiser(saved.unet, saved.text_encoder).state_dict()
    config_dict = {**config.__dict__, "schedule": config.schedule.to_dict(), "vae": vae_payload(vae), "init": init}
    payload = fit(_loop, config_dict, cluster, NAME)
    dest = out / NAME
    assemble(vae, payload["ema"]).save_pretrained(dest, safe_serialization=True)
    return dest
