"""A ControlNet for the text-to-image shapes model: the scene's label map in (the shape's pixels in
its class colour on black, as `shardgen manifest synth --control-maps` colour-codes them), the
caption's colours out. The U-Net and text encoder of builtin:shapes-t2i stay frozen; the
ControlNet starts as a copy of the U-Net's encoder (diffusers' ControlNetModel.from_unet) and
learns the DDPM loss through the U-Net, as ControlNet training does. Saved as a diffusers
ControlNetModel folder (builtin:shapes-controlnet).

``measure`` reports the acceptance figure: on held-out scenes, the share whose generated shape
matches the control mask with IoU >= 0.8 (each pixel is the shape's where it is nearer the
caption's shape colour than its background colour).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

from pipeline.synth.control_maps import colour_coded
from pipeline.training import architectures, data
from pipeline.training.captions import CaptionSampler
from pipeline.training.distributed import Cluster, Schedule, Worker, fit
from pipeline.training.latents import posterior, sample_latents, vae_from_payload, vae_payload

NAME = "shapes-controlnet"
T2I = "shapes-t2i"
# Class indices of the label maps: 0 is the background, then the shapes in data.SHAPES' order.
CLASSES = ("background", *data.SHAPES)
# The conditioning encoder downsamples 32x32 control images to the 8x8 latents (4x: two stride-2 convs).
CONDITIONING_CHANNELS = (16, 32, 32)
IOU_PASS = 0.8
HELD_OUT_SEED = 20261207  # no training scene comes from it


@dataclass(frozen=True)
class ControlNetConfig:
    schedule: Schedule = field(default_factory=lambda: Schedule(steps=3000, batch_size=32, lr=5e-4, warmup=100,
                                                                ema_decay=0.995, log_every=100))
    scenes: int = 8000
    uncond_share: float = 0.1  # the caption is dropped, as classifier-free guidance calls the model without it
    template_share: float = 0.3


def label_map(scene: data.Scene, size: int = data.LOW_RES) -> np.ndarray:
    """The scene's class-index map: the shape's class where it covers at least half a pixel."""
    return np.where(data.coverage(scene, size) >= 0.5, CLASSES.index(scene.shape), 0).astype(np.uint8)


def control_images(scenes: list[data.Scene]) -> torch.Tensor:
    """N x 3 x H x W float control images in [0, 1], as the pipelines' image processor makes them."""
    maps = np.stack([colour_coded(label_map(s), len(CLASSES)) for s in scenes])
    return torch.from_numpy(maps).permute(0, 3, 1, 2).float() / 255.0


class Controlled(torch.nn.Module):
    """The frozen shapes U-Net and text encoder, steered by the trainable ControlNet."""

    def __init__(self, unet, text_encoder, controlnet: ControlNetModel):
        super().__init__()
        self.unet = unet.requires_grad_(False)
        self.text_encoder = text_encoder.requires_grad_(False)
        self.controlnet = controlnet

    def forward(self, x, t, ids, cond):
        text = self.text_encoder(ids)[0]
        down, mid = self.controlnet(x, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        return self.unet(x, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample


def _loop(config: dict) -> None:
    worker = Worker(config)
    scenes = worker.shard(data.sample_scenes(config["scenes"], worker.schedule.seed))
    mean, std = posterior(vae_from_payload(config["vae"]), data.render_all(scenes, data.LOW_RES))
    controls = control_images(scenes)
    t2i = StableDiffusionPipeline.from_pretrained(config["t2i"], use_safetensors=True, local_files_only=True)
    torch.manual_seed(worker.schedule.seed)
    model = Controlled(t2i.unet, t2i.text_encoder,
                       ControlNetModel.from_unet(t2i.unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS))
    captions = CaptionSampler(architectures.tokenizer(), scenes, config["template_share"], config["uncond_share"])
    scheduler = architectures.noise_scheduler()

    def loss_fn(ddp):
        idx = worker.batch_indices(len(mean))
        z0 = sample_latents(mean[idx], std[idx], worker)
        noise = worker.randn(*z0.shape)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(idx),), generator=worker.generator)
        x = scheduler.add_noise(z0, noise, t.to(worker.device))
        predicted = ddp(x, t.to(worker.device), captions(idx, worker.generator).to(worker.device),
                        controls[idx].to(worker.device))
        return torch.nn.functional.mse_loss(predicted, noise)

    result = worker.train(model, loss_fn)
    result["ema"] = {k.removeprefix("controlnet."): v for k, v in result["ema"].items() if k.startswith("controlnet.")}
    worker.finish(result)


def train(out: Path, cluster: Cluster, config: ControlNetConfig = ControlNetConfig()) -> Path:
    """Train into ``out``/shapes-controlnet, for the text-to-image model saved in ``out``."""
    vae = AutoencoderKL.from_pretrained(out / T2I / "vae")
    config_dict = {**config.__dict__, "schedule": config.schedule.to_dict(), "vae": vae_payload(vae),
                   "t2i": str(out / T2I)}
    payload = fit(_loop, config_dict, cluster, NAME)
    unet = StableDiffusionPipeline.from_pretrained(out / T2I, use_safetensors=True, local_files_only=True).unet
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    controlnet.load_state_dict(payload["ema"])
    dest = out / NAME
    controlnet.save_pretrained(dest, safe_serialization=True)
    print(f"{NAME}: {payload['steps']} steps in {payload['seconds']:.0f}s, last losses {payload['losses'][-3:]}",
          flush=True)
    return dest


def shape_mask(image: np.ndarray, scene: data.Scene) -> np.ndarray:
    """The pixels of a generated image nearer the scene's shape colour than its background colour."""
    pixels = image.astype(np.float32)
    fg = np.linalg.norm(pixels - np.array(data.PALETTE[scene.colour], np.float32), axis=-1)
    bg = np.linalg.norm(pixels - np.array(data.PALETTE[scene.background], np.float32), axis=-1)
    return fg < bg


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@torch.no_grad()
def measure(out: Path, images: int = 200, steps: int = 20, guidance: float = 4.0, batch: int = 25) -> dict:
    """The share of ``images`` held-out scenes whose generated shape has IoU >= 0.8 with the control
    mask, with and without the ControlNet (the text-to-image model alone places shapes anywhere)."""
    base = StableDiffusionPipeline.from_pretrained(out / T2I, use_safetensors=True, local_files_only=True)
    controlnet = ControlNetModel.from_pretrained(out / NAME, use_safetensors=True, local_files_only=True)
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    scenes = data.sample_scenes(images, HELD_OUT_SEED)
    figures = {}
    for name, run in (("controlnet", pipe), ("t2i alone", base)):
        scores = []
        for start in range(0, images, batch):
            chunk = scenes[start:start + batch]
            generators = [torch.Generator().manual_seed(start + k) for k in range(len(chunk))]
            kwargs = {"image": control_images(chunk)} if run is pipe else {}
            out_images = run([s.caption for s in chunk], num_inference_steps=steps, guidance_scale=guidance,
                             width=data.LOW_RES, height=data.LOW_RES, generator=generators, output_type="np",
                             **kwargs).images
            scores += [iou(shape_mask((img * 255).round().astype(np.uint8), s), label_map(s) > 0)
                       for img, s in zip(out_images, chunk)]
        figures[name] = {"pass_share": float(np.mean(np.array(scores) >= IOU_PASS)),
                         "mean_iou": float(np.mean(scores)), "n": len(scores)}
        print(f"{name}: IoU >= {IOU_PASS} on {figures[name]['pass_share']:.1%} of {len(scores)} held-out masks "
              f"(mean IoU {figures[name]['mean_iou']:.3f})", flush=True)
    return figures
