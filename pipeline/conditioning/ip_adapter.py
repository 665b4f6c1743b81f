"""IP-Adapters: a reference image per row (the manifest's `reference_image`) steers the image.

An IP-Adapter is a folder (from any model source) holding its weights, one .safetensors file, and
its image encoder in ``image_encoder/``. Each family's adapters are a format of their own
(``FORMATS``): SD 1.x's and SDXL's (``image_proj.*`` and ``ip_adapter.*`` tensors, a
CLIPVisionModelWithProjection: the published IP-Adapter repositories' ``models/`` and
``sdxl_models/`` folders), FLUX.1's (XLabs' ``ip_adapter_proj_model.*`` and ``double_blocks.*``,
a CLIPVisionModelWithProjection) and SD3's (InstantX's SD3.5-Large adapter in diffusers' format,
``image_proj.*`` and ``ip_adapter.*``, a SiglipVisionModel with its image processor). Checked on
the driver; loaded once per actor with diffusers' load_ip_adapter. Diffusers gives every row of a
call the call's reference images, so rows are grouped per reference image: batches stay full where
rows share references (a few style images for many prompts), and a reference of its own costs a
row a call of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from pipeline.errors import ModelError
from pipeline.spec import StageSpec, StorageSpec

COLUMN = "reference_image"
ENCODER = "image_encoder"


@dataclass(frozen=True)
class Format:
    """What a family's IP-Adapter folder holds: the weights' key prefixes (the image projection's,
    the attention layers'; either name of each as diffusers' loader reads them) and the image
    encoder's architecture, with the files it must have beside its config."""
    projection: tuple[str, ...]
    layers: tuple[str, ...]
    encoder: str
    encoder_files: tuple[str, ...] = ()


_UNET = Format(("image_proj",), ("ip_adapter",), "CLIPVisionModelWithProjection")
FORMATS = {
    "sd": _UNET,
    "sdxl": _UNET,
    "flux": Format(("image_proj", "ip_adapter_proj_model"), ("ip_adapter", "double_blocks"),
                   "CLIPVisionModelWithProjection"),
    "sd3": Format(("image_proj",), ("ip_adapter",), "SiglipVisionModel", ("preprocessor_config.json",)),
}
FAMILIES = tuple(FORMATS)


def _weights(folder: Path, source: str, weight_name: str | None, form: Format) -> str:
    """The adapter's weight file in ``folder``, checked to be an IP-Adapter's of the format."""
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
    if not (prefixes & set(form.projection) and prefixes & set(form.layers)):
        raise ModelError(f"ip_adapter: {source}/{name} is not an IP-Adapter's weights of this family's format "
                         f"(no {' or '.join(p + '.*' for p in form.projection)} and "
                         f"{' or '.join(p + '.*' for p in form.layers)} tensors)")
    return name


def locate(stage: StageSpec, storage_spec: StorageSpec | None, family: str) -> tuple[Path, str]:
    """The adapter's local folder (copied once per node for a remote one) and weight file, checked:
    safetensors weights of the family's IP-Adapter format and its image encoder beside them."""
    from pipeline.models.resolve import locate

    source, form = stage.ip_adapter, FORMATS[family]
    folder = locate(source, storage_spec, None, None)
    name = _weights(folder, source, stage.ip_adapter_weight_name, form)
    config = folder / ENCODER / "config.json"
    architectures = json.loads(config.read_text()).get("architectures") if config.is_file() else None
    encoder_files = [p.name for p in (folder / ENCODER).iterdir()] if config.is_file() else []
    if architectures != [form.encoder] or not any(f.endswith(".safetensors") for f in encoder_files) \
            or not set(form.encoder_files) <= set(encoder_files):
        needs = "".join(f" with its {f}" for f in form.encoder_files)
        raise ModelError(f"ip_adapter: {source} has no {ENCODER}/ holding a {form.encoder} in safetensors{needs} "
                         "(the image encoder the adapter was trained with)")
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
    locate(stage, storage_spec, family)


def attach(pipe, stage: StageSpec, storage_spec: StorageSpec | None, family: str) -> None:
    """Load the stage's IP-Adapter and its image encoder into ``pipe``, at the stage's scale."""
    folder, name = locate(stage, storage_spec, family)
    encoder = str(folder / ENCODER)
    # Each mixin names the encoder's folder its own way; a path with a "/" is taken as it is.
    where = {"flux": {"image_encoder_pretrained_model_name_or_path": encoder, "image_encoder_dtype": pipe.dtype},
             "sd3": {"image_encoder_folder": encoder}}.get(family, {"image_encoder_folder": ENCODER})
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=name, local_files_only=True, **where)
    pipe.set_ip_adapter_scale(stage.ip_adapter_scale)

