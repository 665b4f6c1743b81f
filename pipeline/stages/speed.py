"""What a stage does to its loaded pipeline to use a GPU well: channels_last weights for the
convolutional networks, fused attention projections, and (the `compile` option) torch.compile of
the denoiser and the VAE decoder. On CPUs none of it is applied: there it changes rounding, so
images would differ from the plain pipeline's, for no measured gain (docs/performance.md)."""

from __future__ import annotations

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


def compile_pipeline(pipe, cache: Path) -> list[str]:
    """torch.compile the denoiser (U-Net or transformer) and the VAE decoder. Inductor's cache goes
    under the model cache, so that a second actor on the node finds the kernels compiled."""
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
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
