"""IP-Adapters: a reference image per row (the manifest's `reference_image`) steers the image.

An IP-Adapter is a folder (from any model source) holding its weights, one .safetensors file of
``image_proj.*`` and ``ip_adapter.*`` tensors as diffusers saves them, and its image encoder in
``image_encoder/`` (a CLIPVisionModelWithProjection): the layout of the published IP-Adapter
repositories' ``models/`` and ``sdxl_models/`` folders. Checked on the driver; loaded once per
actor with diffusers' load_ip_adapter. Diffusers gives every row of a call the call's reference
images, so rows are grouped per reference image: batches stay full where rows share references
(a few style images for many prompts), and a reference of its own costs a row a call of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from pipeline.errors import ModelError
from pipeline.spec import StageSpec, StorageSpec

COLUMN = "reference_image"
# The families whose diffusers pipelines take an IP-Adapter's embeddings this way (a U-Net's
# cross-attention); FLUX.1's and SD3's IP-Adapters are other formats, not wired here.
FAMILIES = ("sd", "sdxl")
ENCODER = "image_encoder"


def _weights(folder: Path, source: str, weight_name: str | None) -> str:
    """The adapter's weight file in ``folder``, checked to be an IP-Adapter's."""
    from pipeline.models.checks import check_safe_files

    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    check_safe_files("ip_adapter", source, files)
    found = [f for f in files if f.endswith(".safetensors")]
    if weight_name is None and len(found) != 1:
        raise ModelError(f"ip_adapter: {source} holds {len(found)} .safetensors files ({found}); name one with "
                         "ip_adapter_weight_name")
    name = weight_name or found[0]
    if name not in found:
        raise ModelError(f"ip_adapter: {source} has no {name} (it holds {found})")
    with safe_open(folder / name, framework="pt") as f:
        prefixes = {key.split(".", 1)[0] for key in f.keys()}
    if not {"image_proj", "ip_adapter"} <= prefixes:
        raise ModelError(f"ip_adapter: {source}/{name} is not an IP-Adapter's weights (no image_proj.* and "
                         "ip_adapter.* tensors)")
    return name


def locate(stage: StageSpec, storage_spec: StorageSpec | None) -> tuple[Path, str]:
    """The adapter's local folder (copied once per node for a remote one) and weight file, checked:
    safetensors weights of an IP-Adapter and a CLIP vision encoder beside them."""
    from pipeline.models.resolve import locate

    source = stage.ip_adapter
    folder = locate(source, storage_spec, None, None)
    name = _weights(folder, source, stage.ip_adapter_weight_name)
    config = folder / ENCODER / "config.json"
    architectures = json.loads(config.read_text()).get("architectures") if config.is_file() else None
    encoder_files = [p.name for p in (folder / ENCODER).iterdir()] if config.is_file() else []
    if architectures != ["CLIPVisionModelWithProjection"] or not any(f.endswith(".safetensors")
                                                                   for f in encoder_files):
        raise ModelError(f"ip_adapter: {source} has no {ENCODER}/ holding a CLIPVisionModelWithProjection in "
                         "safetensors (the image encoder the adapter was trained with)")
    return folder, name


def check(stage: StageSpec, family: str, pipeline_class: str, storage_spec: StorageSpec | None) -> None:
    """On the driver: the family and the stage's pipeline take IP-Adapters, and the adapter can be
    fetched (exit 2 if not)."""
    import diffusers

    if not stage.ip_adapter:
        return
    if family not in FAMILIES:
        raise ModelError(f"ip_adapter: shardgen runs IP-Adapters on {', '.join(FAMILIES)} (not {family})")
    if not hasattr(getattr(diffusers, pipeline_class), "load_ip_adapter"):  # StableDiffusionAdapterPipeline
        raise ModelError(f"ip_adapter: diffusers' {pipeline_class} takes no IP-Adapter")
    locate(stage, storage_spec)


def attach(pipe, stage: StageSpec, storage_spec: StorageSpec | None) -> None:
    """Load the stage's IP-Adapter and its image encoder into ``pipe``, at the stage's scale."""
    folder, name = locate(stage, storage_spec)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=name, image_encoder_folder=ENCODER,
                         local_files_only=True)
    pipe.set_ip_adapter_scale(stage.ip_adapter_scale)

