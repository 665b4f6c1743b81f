"""What a stage does to its loaded pipeline to use a GPU well: channels_last weights for the
convolutional networks, fused attention projections, and (the `compile` option) torch.compile of
the denoiser and the VAE decoder. On CPUs none of it is applied: there it changes rounding, so
images would differ from the plain pipeline's, for no measured gain (docs/performance.md).

The per-stage speed choices, off unless a stage sets them, apply on any device: an attention
backend, a cache of the denoiser's work between steps, regional compilation. ``check`` refuses,
from model_index.json alone, a choice the model's denoiser cannot take, naming the field.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch


def tune(pipe) -> list[str]:
    """channels_last for the U-Net and VAE (cuDNN's convolutions are fastest in NHWC) and one fused
    QKV projection per attention block where the pipeline offers it; returns what was applied."""
    applied = []
    for name in ("unet", "vae"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.to(memory_format=torch.channels_last)
            applied.append(f"{name}:channels_last")
    if hasattr(pipe, "fuse_qkv_projections"):
        pipe.fuse_qkv_projections()
        applied.append("fused_qkv")
    return applied


def denoiser(pipe):
    """The pipeline's denoising network: its U-Net or its transformer."""
    return getattr(pipe, "transformer", None) or pipe.unet


def _denoiser_class(model_index: dict) -> type | None:
    import diffusers

    entry = model_index.get("transformer") or model_index.get("unet")
    return getattr(diffusers, entry[1], None) if isinstance(entry, list) and len(entry) == 2 else None


def check(stage, model_index: dict) -> str | None:
    """Why ``stage``'s speed choices cannot apply to the model of ``model_index`` (the message
    starts with the field), or None."""
    from diffusers.models.attention_dispatch import AttentionBackendName
    from diffusers.models.cache_utils import CacheMixin

    cls = _denoiser_class(model_index)
    name = cls.__name__ if cls else "no denoiser diffusers knows"
    if stage.attention_backend:
        backends = sorted(b.value for b in AttentionBackendName)
        if stage.attention_backend not in backends:
            return f"attention_backend: {stage.attention_backend!r} is not one of diffusers' backends {backends}"
        # diffusers' attention processors that take a backend carry the attribute _attention_backend.
        processors = [obj for obj in vars(inspect.getmodule(cls)).values() if isinstance(obj, type)] if cls else []
        if not any(hasattr(obj, "_attention_backend") for obj in processors):
            return (f"attention_backend: the model's denoiser ({name}) does not route attention through "
                    "diffusers' attention dispatcher (FLUX.1's transformer does); leave attention_backend unset")
    if stage.cache and not (cls and issubclass(cls, CacheMixin)):
        return (f"cache: the model's denoiser ({name}) takes no diffusers cache hooks (DiT families such as "
                "FLUX.1 do); leave cache unset")
    if stage.compile == "regional" and not getattr(cls, "_repeated_blocks", None):
        return (f"compile: the model's denoiser ({name}) names no repeated blocks to compile one by one; use "
                "compile: true")
    return None


def choose(pipe, stage) -> list[str]:
    """Apply ``stage``'s attention backend and cache (both checked by ``check``); return what was applied."""
    applied = []
    if stage.attention_backend:
        denoiser(pipe).set_attention_backend(stage.attention_backend)
        applied.append(f"attention:{stage.attention_backend}")
    if stage.cache:
        from diffusers.hooks import FirstBlockCacheConfig

        denoiser(pipe).enable_cache(FirstBlockCacheConfig(threshold=stage.cache.threshold))
        applied.append(f"cache:{stage.cache.method}@{stage.cache.threshold:g}")
    return applied


def compile_pipeline(pipe, cache: Path, regional: bool = False) -> list[str]:
    """torch.compile the denoiser (U-Net or transformer) and the VAE decoder; ``regional``: only
    the denoiser's repeated blocks, each compiled once and reused (diffusers'
    compile_repeated_blocks: a fraction of the compile time for most of the speed). Inductor's
    cache goes under the model cache, so that a second actor on the node finds the kernels compiled."""
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
    if regional:
        denoiser(pipe).compile_repeated_blocks()
        return ["denoiser:regional_compiled"]
    applied = []
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            setattr(pipe, name, torch.compile(module))
            applied.append(f"{name}:compiled")
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        vae.decode = torch.compile(vae.decode)
        applied.append("vae.decode:compiled")
    return applied
