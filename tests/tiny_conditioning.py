"""Tiny random-weight conditioning models in the real diffusers formats, built offline: LoRA
adapters (peft layers saved with diffusers' save_lora_weights), ControlNets, IP-Adapters and
T2I-Adapters shaped for the built-in tiny SD 1.x pipeline (builtin:tiny-sd) and the tiny SDXL one
(tests/tiny_pipelines.py), ControlNets and IP-Adapters shaped for the tiny SD3 and FLUX.1
transformers, and a FLUX.1 Control pipeline."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    ControlNetUnionModel,
    FluxControlPipeline,
    FluxTransformer2DModel,
    HunyuanDiT2DModel,
    HunyuanDiTPipeline,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    T2IAdapter,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import IPAdapterAttnProcessor, SD3IPAdapterJointAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, IPAdapterTimeImageProjection
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from tests.tiny_families_more import hunyuan_dit
from tests.tiny_pipelines import _flow_vae, _flux_parts, _flux_transformer, sd3

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


def controlnet_for(model_folder: str | Path, dest: Path, seed: int = 0, spread: float = 0.2,
                   union: bool = False) -> Path:
    """A ControlNet made from the pipeline's UNet (as diffusers' training starts one), with its
    zero-initialised output layers filled at random (normal, ``spread``) so that the control image
    shows; its conditioning encoder downsamples as much as the pipeline's VAE (4x for the tiny
    ones). ``union``: a ControlNetUnionModel of the same shape (six control types, as xinsir's),
    whose control-type transformer is as wide as the first block."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(Path(model_folder) / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 32))
    if union:
        width = unet.config.block_out_channels[0]
        controlnet = ControlNetUnionModel.from_config({**controlnet.config, "num_control_type": 6,
                                                       "num_trans_channel": width, "num_trans_head": 2,
                                                       "num_proj_channel": width})
    return _save_filled(controlnet, dest, spread)


def _save_filled(controlnet, dest: Path, spread: float) -> Path:
    """Fill the ControlNet's zero-initialised layers at random (else it adds nothing: no test
    could see it steer) and save it. A U-Net ControlNet's control-image encoder gets a
    variance-keeping init: with PyTorch's default, its five convolutions shrink the image's own
    signal to 5% of their biases', and two control images steered the picture 1 level of 255 apart."""
    with torch.no_grad():
        for param in controlnet.parameters():
            if not param.any():
                param.normal_(0, spread)
        encoder = getattr(controlnet, "controlnet_cond_embedding", None)
        for conv in [encoder.conv_in, *encoder.blocks] if encoder is not None else []:
            torch.nn.init.kaiming_normal_(conv.weight)
    controlnet.save_pretrained(dest, safe_serialization=True)
    return dest


def transformer_controlnet_for(model_folder: str | Path, dest: Path, controlnet_class, seed: int = 0,
                               spread: float = 0.2, **config) -> Path:
    """A ControlNet of ``controlnet_class`` (SD3ControlNetModel, FluxControlNetModel, ...) shaped as
    the pipeline's transformer (its config, with ``config`` over it: fewer layers, extra
    conditioning channels), its zero-initialised layers filled at random as in controlnet_for."""
    torch.manual_seed(seed)
    shape = dict(controlnet_class.load_config(Path(model_folder) / "transformer"))
    return _save_filled(controlnet_class.from_config({**shape, **config}), dest, spread)


def sd3_for_controlnets() -> StableDiffusion3Pipeline:
    """The tiny SD3 of tests/tiny_pipelines.py with two transformer blocks: SD3's last block updates
    only the image tokens (context_pre_only) and takes no ControlNet residual, so with one block a
    ControlNet would change nothing."""
    pipe = sd3()
    two = SD3Transformer2DModel.from_config({**pipe.transformer.config, "num_layers": 2})
    return StableDiffusion3Pipeline(**{**pipe.components, "transformer": two})


def hunyuan_dit_for_controlnets() -> HunyuanDiTPipeline:
    """The tiny HunyuanDiT of tests/tiny_families_more.py with four blocks: its ControlNet adds to
    the skips of the blocks past the middle, one for every block of its own (layers // 2 - 1), so
    with two blocks there would be none."""
    pipe = hunyuan_dit()
    four = HunyuanDiT2DModel.from_config({**pipe.transformer.config, "num_layers": 4}).eval()
    return HunyuanDiTPipeline(**{**pipe.components, "transformer": four})


def flux_control() -> FluxControlPipeline:
    """A FLUX.1 Control (Canny/Depth [dev]) shaped pipeline: the tiny FLUX.1-dev of
    tests/tiny_pipelines.py with a transformer that reads the control image's packed latents beside
    the noisy ones (4 + 4 channels in, 4 out)."""
    return FluxControlPipeline(vae=_flow_vae(1), transformer=_flux_transformer(8, 4, guidance=True), **_flux_parts())


def ip_adapter_for(model_folder: str | Path, dest: Path, seed: int = 0) -> Path:
    """An IP-Adapter for the pipeline saved at ``model_folder``, laid out as the published ones:
    ``dest``/ip-adapter.safetensors (the image projection and each cross-attention's extra key and
    value projections, keyed as diffusers' IP-Adapter tests key them) beside a tiny CLIP vision
    encoder in ``dest``/image_encoder/ whose projection width is the U-Net's text width."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(Path(model_folder) / "unet")
    width, channels = unet.config.cross_attention_dim, unet.config.block_out_channels
    tensors, key_id = {}, 1
    for name in unet.attn_processors:  # the order diffusers numbers the adapter's layers in
        if name.endswith("attn1.processor"):
            continue
        block = name.split(".")[0]
        hidden = channels[-1] if block == "mid_block" else \
            (channels[::-1] if block == "up_blocks" else channels)[int(name.split(".")[1])]
        layers = IPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=width).state_dict()
        tensors |= {f"ip_adapter.{key_id}.to_k_ip.weight": layers["to_k_ip.0.weight"],
                    f"ip_adapter.{key_id}.to_v_ip.weight": layers["to_v_ip.0.weight"]}
        key_id += 2
    projection = ImageProjection(cross_attention_dim=width, image_embed_dim=width, num_image_text_embeds=4)
    layers = projection.state_dict()
    tensors |= {"image_proj.proj.weight": layers["image_embeds.weight"], "image_proj.proj.bias":
                layers["image_embeds.bias"], "image_proj.norm.weight": layers["norm.weight"],
                "image_proj.norm.bias": layers["norm.bias"]}
    _save(tensors, dest / "ip-adapter.safetensors")
    _clip_encoder(width, dest)
    return dest


def _clip_encoder(width: int, dest: Path) -> None:
    """A tiny CLIP vision encoder whose image embeddings are ``width`` wide, in ``dest``/image_encoder/."""
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=width, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        image_size=32, patch_size=4))
    encoder.save_pretrained(dest / "image_encoder", safe_serialization=True)


def _save(tensors: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def flux_ip_adapter_for(model_folder: str | Path, dest: Path, seed: int = 0) -> Path:
    """A FLUX.1 IP-Adapter for the pipeline saved at ``model_folder``, keyed as XLabs' published
    ip_adapter.safetensors (``ip_adapter_proj_model.*``, the image projection; for each double-stream
    block, ``double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj.*``) beside a tiny CLIP
    vision encoder in ``dest``/image_encoder/."""
    torch.manual_seed(seed)
    config = FluxTransformer2DModel.load_config(Path(model_folder) / "transformer")
    text, embeds = config["joint_attention_dim"], 16
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    projection = ImageProjection(cross_attention_dim=text, image_embed_dim=embeds, num_image_text_embeds=4)
    tensors = {f"ip_adapter_proj_model.{k.replace('image_embeds', 'proj')}": v
               for k, v in projection.state_dict().items()}
    for block in range(config["num_layers"]):
        layers = FluxIPAdapterAttnProcessor(hidden_size=inner, cross_attention_dim=text).state_dict()
        for ours, theirs in (("to_k_ip", "k"), ("to_v_ip", "v")):
            for part in ("weight", "bias"):
                tensors[f"double_blocks.{block}.processor.ip_adapter_double_stream_{theirs}_proj.{part}"] = \
                    layers[f"{ours}.0.{part}"]
    _save(tensors, dest / "ip_adapter.safetensors")
    _clip_encoder(embeds, dest)
    return dest


IP_KEY_GAIN = 4.0


def sd3_ip_adapter_for(model_folder: str | Path, dest: Path, seed: int = 0) -> Path:
    """An SD3 IP-Adapter for the pipeline saved at ``model_folder``, keyed as InstantX's SD3.5-Large
    one in diffusers' format (``image_proj.*``: the timestep-aware resampler, four blocks of 64-wide
    heads as diffusers' loader assumes; ``ip_adapter.N.*``: each transformer block's extra key and
    value projections) beside a tiny SigLIP vision encoder and its image processor in
    ``dest``/image_encoder/."""
    torch.manual_seed(seed)
    config = SD3Transformer2DModel.load_config(Path(model_folder) / "transformer")
    head, inner, hidden, embeds = config["attention_head_dim"], \
        config["attention_head_dim"] * config["num_attention_heads"], 64, 32
    resampler = IPAdapterTimeImageProjection(embed_dim=embeds, output_dim=inner, hidden_dim=hidden, heads=1,
                                             num_queries=4, timestep_in_dim=32)
    tensors = {f"image_proj.{k}": v for k, v in resampler.state_dict().items()}
    for block in range(config["num_layers"]):
        layers = SD3IPAdapterJointAttnProcessor2_0(hidden_size=inner, ip_hidden_states_dim=inner, head_dim=head,
                                                   timesteps_emb_dim=hidden)
        # The reference's four tokens share one softmax with every image token: with unit key norms
        # they drew so little attention that two references steered the picture 1 level of 255 apart.
        layers.norm_ip_k.weight.data.fill_(IP_KEY_GAIN)
        tensors |= {f"ip_adapter.{block}.{k}": v for k, v in layers.state_dict().items()}
    _save(tensors, dest / "ip-adapter.safetensors")
    encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=embeds, intermediate_size=37, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=32, patch_size=4))
    encoder.save_pretrained(dest / "image_encoder", safe_serialization=True)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dest / "image_encoder")
    return dest


def t2i_adapter_for(model_folder: str | Path, dest: Path, seed: int = 0) -> Path:
    """A T2I-Adapter whose features have the widths of the pipeline's U-Net blocks and whose first
    one has the size of the latents (its pixel unshuffle downsamples as much as the VAE)."""
    torch.manual_seed(seed)
    folder = Path(model_folder)
    unet = UNet2DConditionModel.load_config(folder / "unet")
    vae = AutoencoderKL.load_config(folder / "vae")
    adapter = T2IAdapter(in_channels=3, channels=list(unet["block_out_channels"]), num_res_blocks=1,
                         downscale_factor=2 ** (len(vae["block_out_channels"]) - 1), adapter_type="full_adapter")
    adapter.save_pretrained(dest, safe_serialization=True)
    return dest
