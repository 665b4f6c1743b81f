"""What the diffusion trainers share: the VAE posterior of images, caption token ids, the
text-conditioned denoiser DDP wraps, and the DDPM loss of the notes (predict the added noise)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from pipeline.training import architectures, data
from pipeline.training.architectures import SCALING_FACTOR
from pipeline.training.distributed import Worker


def vae_payload(vae: AutoencoderKL) -> dict[str, Any]:
    """The VAE as plain data for the workers' config (Ray ships it to every worker)."""
    return {"config": dict(vae.config), "state": vae.state_dict()}


def vae_from_payload(payload: dict[str, Any]) -> AutoencoderKL:
    vae = AutoencoderKL.from_config(payload["config"])
    vae.load_state_dict(payload["state"])
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def posterior(vae: AutoencoderKL, images: np.ndarray | torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the VAE's latent for uint8 NHWC images (or float NCHW in
    [-1, 1]), computed once, so that training samples a fresh latent each step without running
    the encoder. They are on the VAE's device."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(data.to_tensor_range(images))
    means, stds = [], []
    for i in range(0, len(x), chunk):
        dist = vae.encode(x[i : i + chunk].to(vae.device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, worker: Worker) -> torch.Tensor:
    """A posterior sample, times the scaling factor, as the pipelines scale latents."""
    return (mean.to(worker.device) + std.to(worker.device) * worker.randn(*mean.shape)) * SCALING_FACTOR


def token_ids(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    # Exactly as the Stable Diffusion pipelines tokenize prompts.
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


class Denoiser(torch.nn.Module):
    """U-Net and text encoder as one module, so that DDP trains them together."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, class_labels: torch.Tensor | None = None):
        text = self.text_encoder(ids)[0]  # the last hidden state, as the pipelines use it
        return self.unet(x, t, encoder_hidden_states=text, class_labels=class_labels).sample


def split_denoiser(state: dict[str, torch.Tensor], unet: UNet2DConditionModel, text_encoder: CLIPTextModel) -> None:
    """Load a Denoiser state dict into separate U-Net and text encoder (for the pipeline)."""
    unet.load_state_dict({k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")})
    text_encoder.load_state_dict({k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")})


def pipeline_parts(state: dict[str, torch.Tensor], unet: UNet2DConditionModel,
                   prediction_type: str = "epsilon") -> dict[str, Any]:
    """A trained Denoiser state as pipeline components: ``unet`` (a fresh one of the right shape)
    with the state's weights, the caption encoder and tokenizer, and a fast default sampler on the
    training noise schedule (DDPM over all 1000 steps is a scheduler swap, same config)."""
    tokenizer = architectures.tokenizer()
    text_encoder = architectures.text_encoder(tokenizer)
    split_denoiser(state, unet, text_encoder)
    scheduler = DPMSolverMultistepScheduler.from_config(architectures.noise_scheduler(prediction_type).config)
    return {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


# The shapes pipelines draw flat shapes: no safety checker or its image feature extractor.
NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def ddpm_loss(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    z0: torch.Tensor,
    ids: torch.Tensor | None,
    worker: Worker,
    condition: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDPM training (the notes): noise x_0 to x_t at a uniform random t, predict the noise, MSE
    (``ids`` None for an unconditional model; or the velocity, when the scheduler's prediction_type says "v_prediction"). ``condition`` channels (mask, masked image, low-res image) are concatenated after x_t, in the
    order the pipelines concatenate them."""
    noise = worker.randn(*z0.shape)
    t = torch.randint(scheduler.config.num_train_timesteps, (z0.shape[0],), generator=worker.generator).to(worker.device)
    x = scheduler.add_noise(z0, noise, t)
    if condition is not None:
        x = torch.cat([x, condition], dim=1)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(z0, noise, t)
    return F.mse_loss(model(x, t, None if ids is None else ids.to(worker.device), class_labels), target)
