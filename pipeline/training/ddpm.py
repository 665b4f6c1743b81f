"""The unconditional model: a DDPM in pixel space, as the notes describe it (a U-Net predicting the
added noise, MSE, T = 1000, betas linear 1e-4 to 0.02), over the procedural 32x32 scenes; saved as
a DDPMPipeline (``builtin:shapes-ddpm``). DDIM sampling is a scheduler swap on the same config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from pipeline.training import architectures, data
from pipeline.training.distributed import Cluster, Schedule, Worker, fit
from pipeline.training.latents import ddpm_loss

NAME = "shapes-ddpm"


@dataclass(frozen=True)
class DDPMConfig:
    schedule: Schedule = field(default_factory=lambda: Schedule(steps=20000, batch_size=32, lr=1e-3, warmup=200, ema_decay=0.999, log_every=100))
    scenes: int = 10000


def unet() -> UNet2DModel:
    """Three levels (32x32, 16x16, 8x8; 16/32/64 channels: the full-resolution level is the
    costly one on a CPU), self-attention at 8x8, where the receptive field spans a whole shape."""
    return UNet2DModel(
        sample_size=data.LOW_RES,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=16,
    )


def scheduler() -> DDPMScheduler:
    # The notes' schedule (architectures.noise_scheduler); in pixel space the estimate of x_0 is
    # clipped to the image range while sampling, as DDPM's reference sampler does.
    return DDPMScheduler.from_config(architectures.noise_scheduler().config, clip_sample=True)


class _Denoiser(torch.nn.Module):
    """The U-Net with ddpm_loss's call signature (no caption, no class labels)."""

    def __init__(self, model: UNet2DModel):
        super().__init__()
        self.unet = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: None, class_labels: None) -> torch.Tensor:
        return self.unet(x, t).sample


def _loop(config: dict) -> None:
    worker = Worker(config)
    scenes = worker.shard(data.sample_scenes(config["scenes"], worker.schedule.seed + 4))
    images = torch.from_numpy(data.to_tensor_range(data.render_all(scenes, data.LOW_RES))).to(worker.device)
    model = _Denoiser(unet())
    noise = scheduler()

    def loss_fn(ddp):
        return ddpm_loss(ddp, noise, images[worker.batch_indices(len(images)).to(worker.device)], None, worker)

    result = worker.train(model, loss_fn)
    worker.finish(result)


def train(out: Path, cluster: Cluster, config: DDPMConfig = DDPMConfig()) -> Path:
    payload = fit(_loop, {**config.__dict__, "schedule": config.schedule.to_dict()}, cluster, NAME)
    model = unet()
    model.load_state_dict({k.removeprefix("unet."): v for k, v in payload["ema"].items()})
    dest = out / NAME
    DDPMPipeline(unet=model, scheduler=scheduler()).save_pretrained(dest, safe_serialization=True)
    return dest
