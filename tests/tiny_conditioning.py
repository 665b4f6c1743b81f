"""Tiny random-weight conditioning models in the real diffusers formats, built offline: LoRA
adapters (peft layers saved with diffusers' save_lora_weights) and ControlNets shaped for the
built-in tiny SD 1.x pipeline (builtin:tiny-sd) and the tiny SDXL one (tests/tiny_pipelines.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

# The attention projections most LoRAs train.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def save_lora(unet: UNet2DConditionModel, dest: Path, seed: int = 0, rank: int = 4) -> Path:
    """A LoRA for ``unet`` with random weights in both matrices (peft starts the second at zero,
    which would change nothing), saved as ``dest``/pytorch_lora_weights.safetensors."""
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(dest, unet_lora_layers=layers, safe_serialization=True)
    unet.delete_adapters("default")
    return dest / "pytorch_lora_weights.safetensors"


def lora_for(model_folder: str | Path, dest: Path, seed: int = 0) -> Path:
    """A LoRA that fits the denoiser of the pipeline saved at ``model_folder``."""
    return save_lora(UNet2DConditionModel.from_pretrained(Path(model_folder) / "unet"), dest, seed)


def misfit_lora(dest: Path) -> Path:
    """A LoRA for a UNet whose cross-attention reads 64-wide text features: tiny-sd's read 32."""
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8)
    return save_lora(unet, dest)


def controlnet_for(model_folder: str | Path, dest: Path, seed: int = 0) -> Path:
    """A ControlNet made from the pipeline's UNet (as diffusers' training starts one), with its
    zero-initialised output layers filled at random so that the control image shows; its
    conditioning encoder downsamples as much as the pipeline's VAE (4x for the tiny ones)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(Path(model_folder) / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 32))
    with torch.no_grad():
        for param in controlnet.parameters():
            if not param.any():
                param.normal_(0, 0.2)
    controlnet.save_pretrained(dest, safe_serialization=True)
    return dest
