"""The model configurations: small enough to train on a few CPU cores, in diffusers' formats.

One VAE (scale factor 4, 4 latent channels) serves all three pipelines, so a 32x32 image is an
8x8x4 latent for text-to-image and inpainting, and the x4 upscaler's latents sit at the low-res
size, as StableDiffusionUpscalePipeline requires. The text encoder is a tiny CLIPTextModel over
the in-code BPE vocabulary of pipeline/models/tokenizer.py.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pipeline.models.builtin import small_vae
from pipeline.models.tokenizer import build_tokenizer

TEXT_DIM = 64
# Captions are about ten tokens; a short context keeps cross-attention cheap. Longer prompts are
# truncated by the pipelines, with a warning.
MAX_TOKENS = 24
LATENT_CHANNELS = 4
# StableDiffusionUpscalePipeline forces the VAE's scaling factor to 0.08333 (the real x4
# upscaler's), so the VAE's latents are rescaled after training to a standard deviation of about
# 1 / 0.08333 and every pipeline uses that factor: scaled latents then have unit variance.
SCALING_FACTOR = 0.08333
# The x4 upscaler embeds the noise level added to the low-res image as a class label.
MAX_NOISE_LEVEL = 350
TRAIN_TIMESTEPS = 1000


def tokenizer() -> CLIPTokenizer:
    return build_tokenizer(max_length=MAX_TOKENS)


def text_encoder(tok: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=TEXT_DIM,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )


def vae() -> AutoencoderKL:
    # Scale factor 2 ** (len(blocks) - 1) = 4.
    return small_vae((16, 32, 64), norm_num_groups=8, latent_channels=LATENT_CHANNELS, scaling_factor=SCALING_FACTOR)


def noise_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """DDPM as in the paper: T = 1000, betas linear from 1e-4 to 0.02 (the signal is gone at T).
    The U-Nets predict the noise ("epsilon"), except the upscaler's (see sr.py)."""
    return DDPMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type=prediction_type,
        clip_sample=False,
        # Few-step samplers then start from t = T - 1, pure noise, as training ends there.
        timestep_spacing="trailing",
        # The pipelines rewrite any other value with a warning (it does not act with "trailing").
        steps_offset=1,
    )


def low_res_scheduler() -> DDPMScheduler:
    """The noise the x4 upscaler adds to its low-res input (noise_level is its timestep)."""
    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def _unet(in_channels: int, sample_size: int, attention: tuple[bool, ...], **extra) -> UNet2DConditionModel:
    """A two-level U-Net (32 and 64 channels); ``attention`` says which levels have self- and
    cross-attention blocks (cross-attention is where the caption comes in)."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=16,
        **extra,
    )


def t2i_unet() -> UNet2DConditionModel:
    # 8x8 latents (sample_size 8 makes the pipeline's default output 32x32); attention at 8x8 and 4x4.
    return _unet(LATENT_CHANNELS, 8, (True, True))


def inpaint_unet() -> UNet2DConditionModel:
    # Latents, the mask and the masked image's latents, concatenated: 4 + 1 + 4 channels.
    return _unet(2 * LATENT_CHANNELS + 1, 8, (True, True))


def sr_unet() -> UNet2DConditionModel:
    # Latents at the low-res size plus the (noised) low-res RGB image: 4 + 3 channels.
    # 32x32 latents: attention at the lower level only (16x16), as the task is mostly local.
    return _unet(LATENT_CHANNELS + 3, 32, (False, True), num_class_embeds=MAX_NOISE_LEVEL + 1)
