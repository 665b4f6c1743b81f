"""Tiny random-weight pipelines of the 2025-26 text-to-image families, in the real diffusers formats.

Shapes follow diffusers' own fast tests (``get_dummy_components`` in its tests/pipelines/), with the
LLM encoders of tests/tiny_text_encoders.py and the T5 and flow VAE of tests/tiny_pipelines.py.
Where a pipeline reads its encoder's intermediate layers (FLUX.2 [klein]: 9, 18 and 27), the
encoder has that many layers, so the pipeline runs with its own defaults as a published checkpoint
does. ``FAMILY_BUILDERS`` maps a name to a builder that saves the pipeline into a folder
(safetensors); each makes a 32x32 image in about a second on a CPU.

Not here, because transformers builds their processors only with torchvision, which has no build for
the CPU PyTorch that `make setup` installs: FLUX.2 [dev] (Flux2Pipeline's tokenizer is Mistral 3's
PixtralProcessor) and Qwen-Image-Edit / Edit-Plus (Qwen2VLProcessor).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AuraFlowPipeline,
    AuraFlowTransformer2DModel,
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    ChromaPipeline,
    ChromaTransformer2DModel,
    CogView4Pipeline,
    CogView4Transformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    Lumina2Pipeline,
    Lumina2Transformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)

from tests.tiny_pipelines import DIM, _flow_vae, saved, t5
from tests.tiny_text_encoders import gemma2, glm, qwen2_5_vl, qwen3, umt5


def _vae_2x(latent_channels: int, **extra) -> AutoencoderKL:
    # Two blocks: latents at half the image size.
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
                         latent_channels=latent_channels, sample_size=32, **extra)


def flux2_klein() -> Flux2KleinPipeline:
    """FLUX.2 [klein] 4B-shaped: step-distilled (no true CFG), Qwen3's layers 9, 18, 27 stacked."""
    text_encoder, tokenizer = qwen3(hidden_size=16, num_layers=27, causal_lm=True)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * 16, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=False)
    # One latent channel, patchified 2x2 into the transformer's 4.
    vae = AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
                             latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer, is_distilled=True)


def qwen_image() -> QwenImagePipeline:
    text_encoder, tokenizer = qwen2_5_vl(hidden_size=16)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=4 * 6, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)


def z_image() -> ZImagePipeline:
    text_encoder, tokenizer = qwen3(hidden_size=16, num_layers=2)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    # The padding tokens start as torch.empty (the published weights fill them): give them values.
    with torch.no_grad():
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    vae = _vae_2x(16, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)


def sana() -> SanaPipeline:
    text_encoder, tokenizer = gemma2(hidden_size=8, num_layers=1, head_dim=16)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=32)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407)
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def chroma() -> ChromaPipeline:
    text_encoder, tokenizer = t5()
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=DIM, axes_dims_rope=[4, 4, 8], approximator_hidden_dim=32, approximator_layers=1,
        approximator_num_channels=16)
    return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(1), text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)


def aura_flow() -> AuraFlowPipeline:
    text_encoder, tokenizer = umt5(d_model=DIM)
    transformer = AuraFlowTransformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=DIM,
        out_channels=4, pos_embed_max_size=256)
    return AuraFlowPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_vae_2x(4), transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler())


def lumina2() -> Lumina2Pipeline:
    """Lumina 2 with an 8x VAE: the pipeline takes 8 as the VAE's factor whatever the VAE's shape
    (diffusers' test VAE of one block returns 4x4 images for 32x32)."""
    text_encoder, tokenizer = gemma2(hidden_size=8, num_layers=2, head_dim=4)
    transformer = Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=8, num_layers=2, num_attention_heads=1,
        num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0,
        axes_dim_rope=[4, 2, 2], cap_feat_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[4] * 4, layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, sample_size=32, shift_factor=0.0609,
                        scaling_factor=1.5035)
    return Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                           text_encoder=text_encoder, tokenizer=tokenizer)


def cogview4() -> CogView4Pipeline:
    text_encoder, tokenizer = glm(hidden_size=32, num_layers=2)
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4, out_channels=4,
        text_embed_dim=32, time_embed_dim=8, condition_dim=4)
    scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                use_dynamic_shifting=True, time_shift_type="linear")
    return CogView4Pipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_vae_2x(4), transformer=transformer,
                            scheduler=scheduler)


FAMILY_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "flux2-klein": saved(flux2_klein),
    "qwen-image": saved(qwen_image),
    "z-image": saved(z_image),
    "sana": saved(sana),
    "chroma": saved(chroma),
    "aura-flow": saved(aura_flow),
    "lumina2": saved(lumina2),
    "cogview4": saved(cogview4),
}
