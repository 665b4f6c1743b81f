"""Tiny random-weight pipelines of the families beyond tests/tiny_pipelines.py and tests/tiny_families.py:
the DeepFloyd IF cascade, SD with a safety checker, FLUX.1 Kontext, HunyuanDiT, Kandinsky 3, Stable
Cascade, Würstchen, Kolors, HiDream-I1 and HunyuanImage 2.1, in the real diffusers formats.

Shapes follow diffusers' own fast tests (``get_dummy_components`` in its tests/pipelines/), built
offline from a fixed seed with the CLIP and T5 encoders of tests/tiny_pipelines.py and the LLM, BERT
and ByT5 encoders of tests/tiny_text_encoders.py. ``MORE_BUILDERS`` maps a name to a builder that
saves the pipeline into a folder (safetensors), so it loads with ``from_pretrained`` as the published
checkpoint does. Where a pipeline assumes a size factor of the published model (Kandinsky 3's 8x
MoVQ), the tiny part has it, so the sizes the pipeline accepts and returns are the published ones.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLHunyuanImage,
    DDPMScheduler,
    DDPMWuerstchenScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    HiDreamImagePipeline,
    HiDreamImageTransformer2DModel,
    HunyuanDiT2DModel,
    HunyuanDiTPipeline,
    HunyuanImagePipeline,
    HunyuanImageTransformer2DModel,
    IFPipeline,
    IFSuperResolutionPipeline,
    Kandinsky3Pipeline,
    Kandinsky3UNet,
    KolorsPipeline,
    StableCascadeCombinedPipeline,
    StableCascadeUNet,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    VQModel,
    WuerstchenCombinedPipeline,
)
from diffusers.guiders import AdaptiveProjectedMixGuidance
from diffusers.pipelines.deepfloyd_if import IFWatermarker
from diffusers.pipelines.deprecated import wuerstchen as deprecated_wuerstchen
from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer
from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from sentencepiece import sentencepiece_model_pb2
from transformers import CLIPConfig, CLIPImageProcessor

from pipeline.models.builtin import small_vae, tiny_sd
from pipeline.models.tokenizer import WORDS
from pipeline.stages.base import register_wuerstchen_module
from tests.tiny_pipelines import DIM, _flow_vae, _flux_parts, _flux_transformer, clip, saved, t5
from tests.tiny_text_encoders import bert, byt5, llama, qwen2_5_vl

# The DeepFloyd IF stages' native sizes scaled down 4x (64 -> 16, 256 -> 64): stage II upscales 4x.
IF_STAGE_1_SIZE = 16
IF_STAGE_2_SIZE = 64


def _if_t5():
    # Both IF stages ship the same T5, so stage II can take stage I's prompt embeddings.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return t5()


def _if_unet(sample_size: int, in_channels: int, **extra) -> UNet2DConditionModel:
    # IF's pixel-space UNet: T5 states projected in (encoder_hid_dim), 6 channels out (the noise
    # and the learned variance range).
    return UNet2DConditionModel(
        sample_size=sample_size, block_out_channels=[32, 64], in_channels=in_channels, out_channels=6,
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"], cross_attention_dim=DIM,
        encoder_hid_dim=DIM, attention_head_dim=8, addition_embed_type="text", addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu", **extra)


def _if_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                         beta_end=0.02, thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.0,
                         prediction_type="epsilon", variance_type="learned_range")


def if_stage_1() -> IFPipeline:
    text_encoder, tokenizer = _if_t5()
    return IFPipeline(text_encoder=text_encoder, tokenizer=tokenizer,
                      unet=_if_unet(IF_STAGE_1_SIZE, 3, layers_per_block=1), scheduler=_if_scheduler(),
                      watermarker=IFWatermarker(), safety_checker=None, feature_extractor=None,
                      requires_safety_checker=False)


def if_stage_2() -> IFSuperResolutionPipeline:
    text_encoder, tokenizer = _if_t5()
    # The low-res image, upsampled and noised, comes in as 3 more channels; its noise level is a
    # timestep class embedding.
    unet = _if_unet(IF_STAGE_2_SIZE, 6, layers_per_block=[1, 2], class_embed_type="timestep",
                    mid_block_scale_factor=1.414, time_embedding_act_fn="gelu", time_embedding_dim=32)
    return IFSuperResolutionPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_if_scheduler(),
        image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                              beta_start=0.0001, beta_end=0.02),
        watermarker=IFWatermarker(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def flag_everything_safety_checker() -> tuple[StableDiffusionSafetyChecker, CLIPImageProcessor]:
    """SD's safety checker (a CLIP vision tower) whose concept thresholds lie below any cosine
    similarity, so its own scoring flags every image and blacks it out; and the image processor
    that feeds it."""
    config = CLIPConfig(
        text_config={"hidden_size": DIM, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4},
        vision_config={"hidden_size": DIM, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=DIM)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        # A concept's score is its cosine similarity (>= -1) less its threshold; over 0 flags.
        checker.concept_embeds_weights.fill_(-1.5)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, processor


def sd_flag_everything() -> StableDiffusionPipeline:
    checker, processor = flag_everything_safety_checker()
    parts = {**tiny_sd().components, "safety_checker": checker, "feature_extractor": processor}
    return StableDiffusionPipeline(**parts, requires_safety_checker=True)


def flux_kontext() -> FluxKontextPipeline:
    # FLUX.1 Kontext [dev]: FLUX.1's parts with the guidance embedding; the reference image's
    # latents join the token sequence, not the channels.
    return FluxKontextPipeline(vae=_flow_vae(1), transformer=_flux_transformer(4, guidance=True), **_flux_parts())


def hunyuan_dit() -> HunyuanDiTPipeline:
    text_encoder, tokenizer = bert()
    # The published CLIP-sized BERT reads 77 tokens (the pipeline pads to model_max_length).
    tokenizer.model_max_length = 77
    text_encoder_2, tokenizer_2 = t5()
    transformer = HunyuanDiT2DModel(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8,
                                    num_attention_heads=3, in_channels=4, cross_attention_dim=DIM,
                                    cross_attention_dim_t5=DIM, pooled_projection_dim=16, hidden_size=24,
                                    activation_fn="gelu-approximate")
    # The pipeline places its rotary grid at height // 8 // patch_size whatever the VAE: the tiny VAE
    # keeps the published 8x factor (with the one-block VAE of diffusers' own test they disagree).
    vae = small_vae((8, 8, 8, 8), norm_num_groups=8)
    return HunyuanDiTPipeline(vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer.eval(), scheduler=DDPMScheduler(), safety_checker=None,
                              feature_extractor=None, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                              requires_safety_checker=False)


def kandinsky3() -> Kandinsky3Pipeline:
    text_encoder, tokenizer = t5()
    unet = Kandinsky3UNet(in_channels=4, time_embedding_dim=4, groups=2, attention_head_dim=4, layers_per_block=3,
                          block_out_channels=(32, 64), cross_attention_dim=4, encoder_hid_dim=DIM)
    # Four blocks: the 8x MoVQ the pipeline assumes when it rounds sizes up to multiples of 64.
    movq = VQModel(block_out_channels=[32, 32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 3
                   + ["AttnDownEncoderBlock2D"], in_channels=3, latent_channels=4, layers_per_block=1,
                   norm_num_groups=8, norm_type="spatial", num_vq_embeddings=12, out_channels=3,
                   up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3, vq_embed_dim=4)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="squaredcos_cap_v2",
                              clip_sample=True, thresholding=False)
    return Kandinsky3Pipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), unet=unet, scheduler=scheduler,
                              movq=movq)


def _paella_vq():
    register_wuerstchen_module()
    return deprecated_wuerstchen.PaellaVQModel(bottleneck_blocks=1, num_vq_embeddings=2).eval()


def stable_cascade() -> StableCascadeCombinedPipeline:
    """Stage C (the prior) and stage B (the decoder) in one folder: saved as the combined pipeline,
    every part lies in it and loads offline (the Hub splits them into two repositories)."""
    prior = StableCascadeUNet(conditioning_dim=128, block_out_channels=(128, 128), num_attention_heads=(2, 2),
                              down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1),
                              clip_image_in_channels=768, switch_level=(False,), clip_text_in_channels=DIM,
                              clip_text_pooled_in_channels=DIM)
    blocks = ("SDCascadeResBlock", "SDCascadeTimestepBlock")
    decoder = StableCascadeUNet(
        in_channels=4, out_channels=4, conditioning_dim=128, block_out_channels=(16, 32, 64, 128),
        num_attention_heads=(-1, -1, 1, 2), down_num_layers_per_block=(1, 1, 1, 1),
        up_num_layers_per_block=(1, 1, 1, 1), down_blocks_repeat_mappers=(1, 1, 1, 1),
        up_blocks_repeat_mappers=(3, 3, 2, 2),
        block_types_per_layer=(blocks, blocks, blocks + ("SDCascadeAttnBlock",), blocks + ("SDCascadeAttnBlock",)),
        switch_level=None, clip_text_pooled_in_channels=DIM, dropout=(0.1, 0.1, 0.1, 0.1))
    text_encoder, tokenizer = clip(projection=True)
    prior_text_encoder, prior_tokenizer = clip(projection=True)
    return StableCascadeCombinedPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, decoder=decoder.eval(), scheduler=DDPMWuerstchenScheduler(),
        vqgan=_paella_vq(), prior_prior=prior.eval(), prior_text_encoder=prior_text_encoder,
        prior_tokenizer=prior_tokenizer, prior_scheduler=DDPMWuerstchenScheduler())


def wuerstchen() -> WuerstchenCombinedPipeline:
    prior = deprecated_wuerstchen.WuerstchenPrior(c_in=2, c=8, depth=2, c_cond=DIM, c_r=8, nhead=2)
    decoder = deprecated_wuerstchen.WuerstchenDiffNeXt(c_cond=DIM, c_hidden=[320], nhead=[-1], blocks=[4],
                                                       level_config=["CT"], clip_embd=DIM, inject_effnet=[False])
    text_encoder, tokenizer = clip()
    prior_text_encoder, prior_tokenizer = clip()
    return WuerstchenCombinedPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, decoder=decoder.eval(), scheduler=DDPMWuerstchenScheduler(),
        vqgan=_paella_vq(), prior_tokenizer=prior_tokenizer, prior_text_encoder=prior_text_encoder,
        prior_prior=prior.eval(), prior_scheduler=DDPMWuerstchenScheduler())


def _sentencepiece_model() -> bytes:
    """A SentencePiece unigram model: each shapes word a piece, single characters and then bytes
    (byte fallback) for any other text."""
    spec = sentencepiece_model_pb2.ModelProto
    piece = spec.SentencePiece
    model = spec()
    model.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id = 0, 1, 2
    model.trainer_spec.pad_id = -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.escape_whitespaces = True
    chars = sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
    pieces = [("<unk>", 0.0, piece.UNKNOWN), ("<s>", 0.0, piece.CONTROL), ("</s>", 0.0, piece.CONTROL)]
    pieces += [(f"<0x{b:02X}>", 0.0, piece.BYTE) for b in range(256)]
    pieces += [("▁", -2.0, piece.NORMAL)] + [("▁" + w, -1.0, piece.NORMAL) for w in WORDS]
    pieces += [(c, -5.0, piece.NORMAL) for c in chars]
    for text, score, kind in pieces:
        model.pieces.add(piece=text, score=score, type=kind)
    model.trainer_spec.vocab_size = len(pieces)
    return model.SerializeToString()


def chatglm(vocab_dir: Path):
    """ChatGLM3 (Kolors' encoder, shipped inside diffusers) and its SentencePiece tokenizer, whose
    model file is written into ``vocab_dir`` (the tokenizer copies it from there when saved)."""
    vocab_file = vocab_dir / "tokenizer.model"
    vocab_file.write_bytes(_sentencepiece_model())
    tokenizer = ChatGLMTokenizer(vocab_file=str(vocab_file))
    config = ChatGLMConfig(num_layers=2, padded_vocab_size=len(tokenizer), hidden_size=DIM, ffn_hidden_size=37,
                           kv_channels=8, num_attention_heads=4, seq_length=256, add_qkv_bias=True,
                           multi_query_attention=True, multi_query_group_num=2, original_rope=True,
                           torch_dtype="float32")
    model = ChatGLMModel(config, empty_init=False).eval()
    # ChatGLM's _init_weights does nothing (its weights are always loaded) and its RMSNorm weights
    # start as uninitialised memory: set every weight here.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02)
    return model, tokenizer


def kolors(vocab_dir: Path) -> KolorsPipeline:
    text_encoder, tokenizer = chatglm(vocab_dir)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), cross_attention_dim=DIM, norm_num_groups=1,
        # SDXL's size micro-conditioning (6 numbers of 8) and ChatGLM's pooled last state.
        projection_class_embeddings_input_dim=6 * 8 + DIM)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, sample_size=128)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    return KolorsPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                          image_encoder=None, feature_extractor=None)


def hidream() -> HiDreamImagePipeline:
    # HiDream reads 128 tokens through its (Long-)CLIPs.
    text_encoder, tokenizer = clip(projection=True, positions=128)
    text_encoder_2, tokenizer_2 = clip(projection=True, positions=128)
    text_encoder_3, tokenizer_3 = t5()
    text_encoder_4, tokenizer_4 = llama()
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_channels=[DIM, text_encoder_4.config.hidden_size], text_emb_dim=2 * DIM,
        num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32),
        # The Llama states read: one per layer, as the published model reads all 32.
        llama_layers=tuple(range(text_encoder_4.config.num_hidden_layers)))
    return HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=AutoencoderKL(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3.eval(), tokenizer_3=tokenizer_3, text_encoder_4=text_encoder_4,
        tokenizer_4=tokenizer_4, transformer=transformer.eval())


def hunyuan_image() -> HunyuanImagePipeline:
    """HunyuanImage 2.1 (the guidance-undistilled base): Qwen2.5-VL reads the prompt, ByT5 the
    quoted text to render, each with its own adaptive projected guidance."""
    text_encoder, tokenizer = qwen2_5_vl()
    text_encoder_2, tokenizer_2 = byt5(d_model=DIM)
    transformer = HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=(1, 1), guidance_embeds=False,
        text_embed_dim=text_encoder.config.text_config.hidden_size, text_embed_2_dim=DIM,
        rope_axes_dim=(4, 4))
    vae = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=4,
                                    block_out_channels=(32, 64, 64, 64), layers_per_block=1, scaling_factor=0.476986,
                                    spatial_compression_ratio=8, sample_size=128)
    return HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
        guider=AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=2),
        ocr_guider=AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=3))


def build_kolors(folder: Path) -> Path:
    with tempfile.TemporaryDirectory() as vocab_dir:
        return saved(functools.partial(kolors, Path(vocab_dir)))(folder)


MORE_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "if-stage-1": saved(if_stage_1),
    "if-stage-2": saved(if_stage_2),
    "sd-flag-everything": saved(sd_flag_everything),
    "flux-kontext": saved(flux_kontext),
    "hunyuan-dit": saved(hunyuan_dit),
    "kandinsky3": saved(kandinsky3),
    "stable-cascade": saved(stable_cascade),
    "wuerstchen": saved(wuerstchen),
    "kolors": build_kolors,
    "hidream": saved(hidream),
    "hunyuan-image-2.1": saved(hunyuan_image),
}
