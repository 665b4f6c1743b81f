"""Inpainting: the text-to-image DDPM with the mask and the masked image's latents as 5 extra
input channels (9 in all), started from the text-to-image weights with the new channels' input
weights at zero (as Stable Diffusion's inpainting model was made), saved as a
StableDiffusionInpaintPipeline.

Masks are mostly a box around the shape (so the model learns to redraw a shape as the caption
says) and sometimes a random box; all are in whole 4-pixel latent cells.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

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
from pipeline.training.t2i import NAME as T2I_NAME

NAME = "shapes-inpaint"
LATENT_SIZE = data.LOW_RES // 4


@dataclass(frozen=True)
class InpaintConfig:
    schedule: Schedule = field(default_factory=lambda: Schedule(steps=1000, batch_size=64, lr=5e-4, warmup=50, ema_decay=0.999, log_every=100))
    scenes: int = 16000
    shape_box_share: float = 0.75
    # Box masks padded up to this many pixels around the shape (people draw loose masks).
    max_pad_px: float = 9.0
    uncond_share: float = 0.1
    template_share: float = 0.3
    # People asking to repaint a region name what goes there ("a red circle"), not the background
    # they already have: the first models followed such prompts in 6 cases of 10 (issue 16).
    shape_only_share: float = 0.6


def training_mask(scene: data.Scene, rng: np.random.Generator, shape_box_share: float, max_pad_px: float) -> np.ndarray:
    if rng.random() < shape_box_share:
        # Weighted towards tight boxes: there the model has the least room to draw the asked shape
        # (a circle must touch the box's edges), and loose masks were already learnt.
        box = data.shape_box(scene, data.LOW_RES, align=4, pad_px=max_pad_px * rng.random() ** 1.5)
    else:
        h, w = (int(v) for v in rng.integers(2, 7, size=2) * 4)
        top, left = (int(v) for v in rng.integers(0, LATENT_SIZE + 1 - np.array([h, w]) // 4) * 4)
        box = (top, left, top + h, left + w)
    return data.box_mask(box, data.LOW_RES)


def _loop(config: dict) -> None:
    worker = Worker(config)
    scenes = worker.shard(data.sample_scenes(config["scenes"], worker.schedule.seed + 3))
    rng = np.random.default_rng(worker.schedule.seed * 1_000 + worker.rank)
    masks = torch.from_numpy(np.stack([training_mask(s, rng, config["shape_box_share"], config["max_pad_px"]) for s in scenes]))[:, None]
    images = torch.from_numpy(data.to_tensor_range(data.render_all(scenes, data.LOW_RES)))
    vae = vae_from_payload(config["vae"])
    mean, std = posterior(vae, images)
    # As the pipeline builds it: masked pixels set to 0 (grey), then encoded.
    masked_mean, masked_std = posterior(vae, images * (masks < 0.5))
    # As the pipeline resizes the mask to the latent grid (nearest).
    latent_masks = F.interpolate(masks, size=(LATENT_SIZE, LATENT_SIZE))
    tokenizer = architectures.tokenizer()
    captions = CaptionSampler(tokenizer, scenes, config["template_share"], config["uncond_share"], config["shape_only_share"])
    model = Denoiser(architectures.inpaint_unet(), architectures.text_encoder(tokenizer))
    model.load_state_dict(config["init"])
    scheduler = architectures.noise_scheduler()

    def loss_fn(ddp):
        idx = worker.batch_indices(len(mean))
        z0 = sample_latents(mean[idx], std[idx], worker)
        condition = torch.cat([latent_masks[idx].to(worker.device), sample_latents(masked_mean[idx], masked_std[idx], worker)], dim=1)
        return ddpm_loss(ddp, scheduler, z0, captions(idx, worker.generator), worker, condition=condition)

    worker.finish(worker.train(model, loss_fn))


def init_from_text_to_image(t2i: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """A Denoiser state for the 9-channel U-Net: the text-to-image weights, with zero input weights
    for the mask and masked-image channels (so training starts from the text-to-image model)."""
    state = {f"unet.{k}": v for k, v in t2i.unet.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in t2i.text_encoder.state_dict().items()})
    weight = state["unet.conv_in.weight"]
    extra = architectures.inpaint_unet().config.in_channels - weight.shape[1]
    state["unet.conv_in.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], extra, *weight.shape[2:])], dim=1)
    return state


def assemble(t2i: StableDiffusionPipeline, state: dict) -> StableDiffusionInpaintPipeline:
    return StableDiffusionInpaintPipeline(vae=t2i.vae, **pipeline_parts(state, architectures.inpaint_unet()),
                                          **NO_SAFETY_CHECKER)


def train(out: Path, cluster: Cluster, config: InpaintConfig = InpaintConfig(), resume: bool = False) -> Path:
    """Train into ``out``/shapes-inpaint from the text-to-image model there; ``resume`` starts from
    the inpainting model saved there instead."""
    t2i = StableDiffusionPipeline.from_pretrained(out / T2I_NAME, use_safetensors=True, local_files_only=True)
    if resume:
        saved = StableDiffusionInpaintPipeline.from_pretrained(out / NAME, use_safetensors=True, local_files_only=True)
        init = Denoiser(saved.unet, saved.text_encoder).state_dict()
    else:
        init = init_from_text_to_image(t2i)
    config_dict = {**config.__dict__, "schedule": config.schedule.to_dict(), "vae": vae_payload(t2i.vae), "init": init}
    payload = fit(_loop, config_dict, cluster, NAME)
    dest = out / NAME
    assemble(t2i, payload["ema"]).save_pretrained(dest, safe_serialization=True)
    return dest
