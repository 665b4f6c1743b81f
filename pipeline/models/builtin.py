"""Built-in models: tiny random-weight pipelines in the real diffusers formats.

They are built offline (no downloads), saved with ``save_pretrained`` as safetensors and then
loaded with ``from_pretrained`` like any checkpoint, so the code paths that load them are the ones
that load real Stable Diffusion checkpoints. Weights come from a fixed torch seed, so every node
that builds them gets the same bytes and the same images.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from pipeline.models.tokenizer import build_tokenizer

TEXT_DIM = 32
# Noise levels the upscaler's UNet embeds as classes (the real x4 upscaler uses 350 of 1000).
UPSCALER_MAX_NOISE_LEVEL = 350


def _text_encoder_and_tokenizer():
    tokenizer = build_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config), tokenizer


def small_vae(blocks: tuple[int, ...], norm_num_groups: int = 16, latent_channels: int = 4, **extra) -> AutoencoderKL:
    """A small AutoencoderKL (also the trained shapes models' VAE, see
    pipeline/training/architectures.py); ``extra`` goes to AutoencoderKL as it is."""
    # The VAE's scale factor is 2 ** (len(blocks) - 1).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=blocks,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=norm_num_groups,
        **extra,
    )


def _unet(in_channels: int, **extra) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        # Attention only at the lower resolution keeps the tiny model cheap on a CPU.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        **extra,
    )


def _stable_diffusion(pipeline_class, unet_in_channels: int) -> DiffusionPipeline:
    text_encoder, tokenizer = _text_encoder_and_tokenizer()
    return pipeline_class(
        vae=small_vae((32, 32, 64)),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=_unet(unet_in_channels),
        scheduler=DPMSolverMultistepScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sd() -> DiffusionPipeline:
    return _stable_diffusion(StableDiffusionPipeline, 4)


def tiny_inpaint() -> DiffusionPipeline:
    # 9 input channels: latents, the mask, and the masked image's latents.
    return _stable_diffusion(StableDiffusionInpaintPipeline, 9)


def tiny_upscaler() -> DiffusionPipeline:
    text_encoder, tokenizer = _text_encoder_and_tokenizer()
    # The x4 upscaler: latents at the low-res size (a VAE with scale factor 4), the low-res image
    # concatenated as 3 extra channels, and the noise level embedded as a class label.
    return StableDiffusionUpscalePipeline(
        vae=small_vae((32, 32, 64)),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=_unet(7, num_class_embeds=UPSCALER_MAX_NOISE_LEVEL + 1),
        low_res_scheduler=DDPMScheduler(),
        scheduler=DDIMScheduler(prediction_type="v_prediction"),
        max_noise_level=UPSCALER_MAX_NOISE_LEVEL,
    )


BUILDERS: dict[str, Callable[[], DiffusionPipeline]] = {
    "tiny-sd": tiny_sd,
    "tiny-upscaler": tiny_upscaler,
    "tiny-inpaint": tiny_inpaint,
}


def build(name: str, dest: Path) -> Path:
    """Build the built-in model ``name`` into the folder ``dest`` (which must not exist yet)."""
    if name not in BUILDERS:
        raise KeyError(f"unknown built-in model {name!r}; built-in models: {sorted(BUILDERS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = BUILDERS[name]()
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest
