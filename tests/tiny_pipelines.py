"""Tiny random-weight pipelines of every model family, in the real diffusers formats.

Shapes follow diffusers' own fast tests (a few channels, one or two layers), built offline from a
fixed seed: CLIP BPE tokenizers from pipeline/models/tokenizer.py and a T5 Unigram tokenizer from
an in-code vocabulary. ``build_all`` saves each with ``save_pretrained`` as safetensors, so the
stages load them with ``from_pretrained`` as they would load the published checkpoints.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxFillPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    LDMPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionLatentUpscalePipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from pipeline.models.builtin import small_vae
from pipeline.models.tokenizer import WORDS, build_tokenizer

DIM = 32  # every text encoder's width


def t5_tokenizer() -> T5TokenizerFast:
    """A T5 Unigram tokenizer: each word of the shapes vocabulary is a piece, and single characters
    cover any other text (unknown characters become <unk>)."""
    chars = sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=512)


def t5() -> tuple[T5EncoderModel, T5TokenizerFast]:
    tokenizer = t5_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=DIM, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config), tokenizer


def clip(projection: bool = False, positions: int = 77):
    """``positions``: the tokens it reads (77 as OpenAI's CLIP; more for Long-CLIP)."""
    tokenizer = build_tokenizer(positions)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=DIM, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, projection_dim=DIM, max_position_embeddings=positions,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config), tokenizer


def _flow_vae(latent_channels: int) -> AutoencoderKL:
    # The SD3 / FLUX.1 VAE of diffusers' tests: one block (scale factor 1), no quant convs.
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def _sdxl_unet(cross_attention_dim: int, time_ids: int, in_channels: int = 4) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=16, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, cross_attention_dim=cross_attention_dim,
        # The size micro-conditioning: 6 numbers (5 with the refiner's aesthetic score) of 8 each,
        # then the pooled text embedding.
        projection_class_embeddings_input_dim=time_ids * 8 + DIM,
    )


def _sdxl_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                                  timestep_spacing="leading")


def sdxl(pipeline_class=StableDiffusionXLPipeline, unet_in_channels: int = 4):
    text_encoder, tokenizer = clip()
    text_encoder_2, tokenizer_2 = clip(projection=True)
    return pipeline_class(vae=small_vae((32, 32, 64)), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                          tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=_sdxl_unet(2 * DIM, 6, unet_in_channels),
                          scheduler=_sdxl_scheduler())


def sdxl_refiner():
    text_encoder_2, tokenizer_2 = clip(projection=True)
    return StableDiffusionXLImg2ImgPipeline(
        vae=small_vae((32, 32, 64)), text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None,
        tokenizer_2=tokenizer_2, unet=_sdxl_unet(DIM, 5), scheduler=_sdxl_scheduler(),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)


def sd3():
    text_encoder, tokenizer = clip(projection=True)
    text_encoder_2, tokenizer_2 = clip(projection=True)
    text_encoder_3, tokenizer_3 = t5()
    # 16 latent channels, as SD3's: its inpainting blends latents only for those.
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=16, out_channels=16, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=DIM,
                                        joint_attention_dim=DIM, pooled_projection_dim=2 * DIM)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=_flow_vae(16), text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def _flux_parts():
    # The same seed gives FLUX.1 and FLUX.1 Fill the same text encoders, as the published ones share.
    torch.manual_seed(1)
    text_encoder, tokenizer = clip()
    text_encoder_2, tokenizer_2 = t5()
    return {"text_encoder": text_encoder, "tokenizer": tokenizer, "text_encoder_2": text_encoder_2,
            "tokenizer_2": tokenizer_2, "scheduler": FlowMatchEulerDiscreteScheduler()}


def _flux_transformer(in_channels: int, out_channels: int | None = None, guidance: bool = False):
    return FluxTransformer2DModel(patch_size=1, in_channels=in_channels, out_channels=out_channels, num_layers=1,
                                  num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                  joint_attention_dim=DIM, pooled_projection_dim=DIM, axes_dims_rope=[4, 4, 8],
                                  guidance_embeds=guidance)


def flux(guidance: bool = False):
    """FLUX.1-schnell-shaped (no guidance embedding); ``guidance``: FLUX.1-dev-shaped."""
    parts = _flux_parts()
    # Latents are packed 2x2: 1 latent channel makes 4 transformer channels.
    return FluxPipeline(vae=_flow_vae(1), transformer=_flux_transformer(4, guidance=guidance), **parts)


def flux_fill():
    parts = _flux_parts()
    # 2 latent channels packed 2x2 (8), the masked image's latents (8) and the mask (4).
    return FluxFillPipeline(vae=_flow_vae(2), transformer=_flux_transformer(20, 8, guidance=True), **parts)


def pixart_sigma():
    text_encoder, tokenizer = t5()
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=DIM,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    return PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=small_vae((32, 32, 64)),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())


def latent_upscaler():
    text_encoder, tokenizer = clip()
    # The K-diffusion UNet of diffusers' latent upscaler test: 4 latent channels and the 4 of the
    # upsampled low-res latents in, the denoised latents and a scale out; the noise level (128)
    # and the pooled prompt condition each step.
    unet = UNet2DConditionModel(
        act_fn="gelu", attention_head_dim=8, norm_num_groups=None, block_out_channels=(32, 32, 64, 64),
        time_cond_proj_dim=128 + DIM, conv_in_kernel=1, conv_out_kernel=1, cross_attention_dim=DIM,
        down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
        in_channels=8, mid_block_type=None, only_cross_attention=False, out_channels=5,
        resnet_time_scale_shift="scale_shift", time_embedding_type="fourier", timestep_post_act="gelu",
        up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"))
    return StableDiffusionLatentUpscalePipeline(vae=small_vae((32, 64)), text_encoder=text_encoder,
                                                tokenizer=tokenizer, unet=unet,
                                                scheduler=EulerDiscreteScheduler(prediction_type="sample"))


def _uncond_unet(sample_size: int) -> UNet2DModel:
    return UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64), norm_num_groups=16,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def ddpm():
    return DDPMPipeline(unet=_uncond_unet(16), scheduler=DDPMScheduler(num_train_timesteps=1000))


def ldm():
    vqvae = VQModel(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=3,
                    norm_num_groups=16, down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2)
    return LDMPipeline(vqvae=vqvae, unet=_uncond_unet(8), scheduler=DDIMScheduler())


BUILDERS: dict[str, Callable] = {
    "sdxl": sdxl,
    "sdxl-refiner": sdxl_refiner,
    # 9 UNet input channels: latents, the mask and the masked image's latents.
    "sdxl-inpaint": lambda: sdxl(StableDiffusionXLInpaintPipeline, 9),
    "sd3": sd3,
    "flux": flux,
    "flux-dev": lambda: flux(guidance=True),
    "flux-fill": flux_fill,
    "pixart-sigma": pixart_sigma,
    "latent-upscaler": latent_upscaler,
    "ddpm": ddpm,
    "ldm": ldm,
}


def saved(make: Callable) -> Callable[[Path], Path]:
    """A builder: ``make()``'s pipeline from torch seed 0 (the global generator left as it was), saved
    into ``folder`` as safetensors."""

    @functools.wraps(make)
    def build(folder: Path) -> Path:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            pipe = make()
        pipe.save_pretrained(folder, safe_serialization=True)
        return folder

    return build


def build_all(folder: Path) -> dict[str, str]:
    """Save every tiny pipeline under ``folder``; return {name: its folder}."""
    return {name: str(saved(builder)(folder / name)) for name, builder in BUILDERS.items()}
