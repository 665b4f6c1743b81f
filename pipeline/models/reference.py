"""Random-weight pipelines in the real Stable Diffusion 1.5 and SDXL architectures, built offline.

The benchmark needs the compute of the real models, not their pictures: the configs below are the
published ones (the `unet`, `vae` and text encoders of stable-diffusion-v1-5 and
stable-diffusion-xl-base-1.0), with random weights and the in-code tokenizer. ``tiny=True`` keeps
the same pipeline classes and wiring at a size a CPU runs in seconds (``shardgen bench --gpu
--quick``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pipeline.models.tokenizer import build_tokenizer

ARCHITECTURES = ("sd15", "sdxl")

# Stable Diffusion's noise schedule, which both models were trained with.
_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "steps_offset": 1}


def _clip(tokenizer, hidden: int, layers: int, heads: int, projection: int | None = None, act: str = "quick_gelu"):
    config = CLIPTextConfig(
        vocab_size=max(49408, len(tokenizer)) if hidden >= 768 else len(tokenizer),
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        max_position_embeddings=77, hidden_act=act, projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _vae(tiny: bool, sample_size: int, scaling_factor: float) -> AutoencoderKL:
    blocks = (32, 64) if tiny else (128, 256, 512, 512)
    return AutoencoderKL(
        block_out_channels=blocks, down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks), latent_channels=4,
        layers_per_block=1 if tiny else 2, norm_num_groups=16 if tiny else 32, sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def sd15(tiny: bool = False) -> StableDiffusionPipeline:
    tokenizer = build_tokenizer()
    if tiny:
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8)
        text_encoder = _clip(tokenizer, 32, 2, 4)
    else:
        # diffusers' UNet2DConditionModel defaults are SD 1.x's, but for the text width.
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        text_encoder = _clip(tokenizer, 768, 12, 12)
    return StableDiffusionPipeline(
        vae=_vae(tiny, 512, 0.18215), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler(**_SCHEDULE), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def sdxl(tiny: bool = False) -> StableDiffusionXLPipeline:
    tokenizer = build_tokenizer()
    if tiny:
        width, width_2, time_dim = 32, 32, 8
        unet_blocks = {"block_out_channels": (32, 64), "transformer_layers_per_block": (1, 2),
                       "attention_head_dim": (2, 4), "norm_num_groups": 16, "sample_size": 16,
                       "layers_per_block": 1}
        text_encoder, text_encoder_2 = _clip(tokenizer, width, 2, 4), _clip(tokenizer, width_2, 2, 4, width_2, "gelu")
    else:
        width, width_2, time_dim = 768, 1280, 256
        unet_blocks = {"block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10),
                       "attention_head_dim": (5, 10, 20), "norm_num_groups": 32, "sample_size": 128,
                       "layers_per_block": 2}
        text_encoder = _clip(tokenizer, width, 12, 12)
        text_encoder_2 = _clip(tokenizer, width_2, 32, 20, width_2, "gelu")
    levels = len(unet_blocks["block_out_channels"])
    unet = UNet2DConditionModel(
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=width + width_2, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # The pooled text embedding and six size/crop numbers, each embedded with time_dim.
        projection_class_embeddings_input_dim=width_2 + 6 * time_dim, **unet_blocks)
    return StableDiffusionXLPipeline(
        # force_upcast off: random weights do not overflow bf16, and the fp16-fixed VAE people use
        # for SDXL runs in half precision too.
        vae=_vae(tiny, 1024, 0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=DPMSolverMultistepScheduler(**_SCHEDULE),
        force_zeros_for_empty_prompt=False)


def build(arch: str, dest: Path, tiny: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """Build ``arch`` with seed-0 random weights on ``device`` (fast on a GPU) and save it to
    ``dest`` in ``dtype`` as safetensors, as a checkpoint is laid out."""
    builders = {"sd15": sd15, "sdxl": sdxl}
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        pipe: DiffusionPipeline = builders[arch](tiny)
    pipe.to(dtype=dtype).save_pretrained(dest, safe_serialization=True)
    return dest
