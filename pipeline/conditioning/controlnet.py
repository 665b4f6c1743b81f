"""ControlNets and T2I-Adapters of a stage: the diffusers pipeline class each family and kind runs
with one, the models (a folder of config.json and safetensors weights, from any model source;
checked on the driver like a model folder), and their call arguments, in the form each pipeline
takes them.

A saved ``...ControlNetPipeline`` named as the model counts as its base family with the
ControlNet it holds; a stage's own `controlnet` replaces that one. A ControlNet Union (SDXL's
ControlNetUnionModel, a FLUX.1 ControlNet with num_mode) reads the stage's `control_mode`. FLUX.1
Control models read the control image with no ControlNet (MODEL_CONTROL).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import ModelError
from pipeline.spec import StageSpec, StorageSpec

# family -> stage kind -> the diffusers pipeline that runs it with a ControlNet.
PIPELINES: dict[str, dict[str, str]] = {
    "sd": {"text_to_image": "StableDiffusionControlNetPipeline",
           "image_to_image": "StableDiffusionControlNetImg2ImgPipeline",
           "inpainting": "StableDiffusionControlNetInpaintPipeline"},
    "sdxl": {"text_to_image": "StableDiffusionXLControlNetPipeline",
             "image_to_image": "StableDiffusionXLControlNetImg2ImgPipeline",
             "inpainting": "StableDiffusionXLControlNetInpaintPipeline"},
    "sd3": {"text_to_image": "StableDiffusion3ControlNetPipeline",
            "inpainting": "StableDiffusion3ControlNetInpaintingPipeline"},
    "flux": {"text_to_image": "FluxControlNetPipeline", "image_to_image": "FluxControlNetImg2ImgPipeline",
             "inpainting": "FluxControlNetInpaintPipeline"},
    "qwenimage": {"text_to_image": "QwenImageControlNetPipeline", "inpainting": "QwenImageControlNetInpaintPipeline"},
    "z-image": {"text_to_image": "ZImageControlNetPipeline", "inpainting": "ZImageControlNetInpaintPipeline"},
    "hunyuan": {"text_to_image": "HunyuanDiTControlNetPipeline"},
}
# A ControlNet Union: one model, several control images each of a control type (`control_mode`).
UNION = "ControlNetUnionModel"
# family -> stage kind -> the diffusers pipeline that runs it with a ControlNet Union.
UNION_PIPELINES: dict[str, dict[str, str]] = {
    "sdxl": {"text_to_image": "StableDiffusionXLControlNetUnionPipeline",
             "image_to_image": "StableDiffusionXLControlNetUnionImg2ImgPipeline",
             "inpainting": "StableDiffusionXLControlNetUnionInpaintPipeline"},
}
UNION_CLASSES = {name for kinds in UNION_PIPELINES.values() for name in kinds.values()}
# The pipelines whose model reads the control image itself, with no ControlNet: FLUX.1 Control
# (Canny/Depth [dev]) packs the control image's latents beside the noisy ones into its transformer.
MODEL_CONTROL = {"FluxControlPipeline", "FluxControlImg2ImgPipeline", "FluxControlInpaintPipeline"}
# family -> stage kind -> the diffusers pipeline that runs it with a T2I-Adapter.
ADAPTER_PIPELINES: dict[str, dict[str, str]] = {
    "sd": {"text_to_image": "StableDiffusionAdapterPipeline"},
    "sdxl": {"text_to_image": "StableDiffusionXLAdapterPipeline"},
}
# A saved ControlNet pipeline's class -> the class its family is detected by.
SAVED = {cls: {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
               "flux": "FluxPipeline", "qwenimage": "QwenImagePipeline", "z-image": "ZImagePipeline",
               "hunyuan": "HunyuanDiTPipeline"}[family]
         for table in (PIPELINES, UNION_PIPELINES) for family, kinds in table.items() for cls in kinds.values()}


def base_index(model_index: dict) -> dict:
    """``model_index`` as its family is detected: a saved ControlNet pipeline as its base pipeline."""
    name = model_index.get("_class_name")
    return {**model_index, "_class_name": SAVED[name]} if name in SAVED else model_index


def holds_controlnet(model_index: dict) -> bool:
    value = model_index.get("controlnet")
    return isinstance(value, list) and len(value) == 2 and value[0] is not None


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def model_class(folder: Path) -> str:
    """The diffusers class to load a checked folder with: its config.json's, except a ControlNet
    Union saved under ControlNetModel's name (xinsir's published SDXL Union), known by its weights'
    control-type embedding (read from the safetensors headers alone)."""
    from safetensors import safe_open

    name = _config(folder)["_class_name"]
    if name == "ControlNetModel":
        for file in folder.glob("*.safetensors"):
            with safe_open(file, "pt") as weights:
                if "task_embedding" in weights.keys():
                    return UNION
    return name


def controlnet_classes(stage: StageSpec, model_index: dict, storage_spec: StorageSpec | None) -> list[str]:
    """The diffusers class of each ControlNet the stage runs with: its own (from their
    config.json), else the one a saved ControlNet pipeline holds."""
    if stage.controlnet:
        return [model_class(locate(source, storage_spec)) for source in stage.controlnet]
    return _held_classes(model_index)


def _held_classes(model_index: dict) -> list[str]:
    """The class of the ControlNet a saved ControlNet pipeline holds, or none."""
    return [model_index["controlnet"][1]] if holds_controlnet(model_index) else []


def pipeline_class(family: str, stage: StageSpec, model_index: dict, plain: str,
                   storage_spec: StorageSpec | None) -> str:
    """The pipeline class a stage runs: ``plain`` (its family's) unless it has a ControlNet (a
    ControlNet Union has pipelines of its own) or a T2I-Adapter."""
    if stage.t2i_adapter:
        field, table = "t2i_adapter", ADAPTER_PIPELINES
    elif stage.controlnet or holds_controlnet(model_index):
        union = UNION in controlnet_classes(stage, model_index, storage_spec)
        field, table = ("controlnet", UNION_PIPELINES) if union else ("controlnet", PIPELINES)
    else:
        return plain
    found = table.get(family, {}).get(stage.kind)
    if found is None:
        raise ModelError(f"{field}: shardgen runs them on {', '.join(sorted(table))} (not {family}) for "
                         f"{stage.kind}")
    return found


# A stage's control setting -> the pipeline argument it is.
SETTINGS = {"controlnet_scale": "controlnet_conditioning_scale", "control_start": "control_guidance_start",
            "control_end": "control_guidance_end"}


def settings_problem(pipeline: str, stage: StageSpec) -> str | None:
    """Why ``stage`` cannot run ``pipeline`` with the control settings it sets, or None: a setting
    whose argument the pipeline lacks (FLUX.1 Control has no ControlNet to scale; Z-Image's and
    HunyuanDiT's ControlNet pipelines apply at every step)."""
    import inspect

    import diffusers

    takes = inspect.signature(getattr(diffusers, pipeline).__call__).parameters
    lacking = sorted(name for name in SETTINGS.keys() & stage.model_fields_set if SETTINGS[name] not in takes)
    if lacking:
        return (f"{', '.join(lacking)}: {pipeline} takes no {', '.join(SETTINGS[n] for n in lacking)}; leave "
                f"{'them' if len(lacking) > 1 else 'it'} unset")
    return None


def model_control_problem(plain: str, stage: StageSpec, model_index: dict) -> str | None:
    """For a pipeline whose model reads the control image itself (FLUX.1 Control), the settings it
    cannot take (settings_problem); for any other, a `control` with nothing to read its image."""
    if plain in MODEL_CONTROL:
        return settings_problem(plain, stage)
    if stage.control and not (stage.controlnet or stage.t2i_adapter or holds_controlnet(model_index)):
        return ("control: makes a control image for a ControlNet, a T2I-Adapter or a FLUX.1 Control model; set "
                "`controlnet` or `t2i_adapter` too")
    return None


# The field naming a conditioning model -> a word its diffusers class name holds.
CLASS_WORD = {"controlnet": "ControlNet", "t2i_adapter": "Adapter"}


def _check_folder(field: str, source: str, files: list[str], config: dict | None) -> str:
    """The folder's model class, or ModelError: safetensors only, no code, a diffusers class of
    the field's kind."""
    import diffusers

    from pipeline.models.checks import check_safe_files

    check_safe_files(field, source, files)
    name = (config or {}).get("_class_name")
    found = getattr(diffusers, name, None) if isinstance(name, str) else None
    word = CLASS_WORD[field]
    if not (isinstance(found, type) and issubclass(found, diffusers.ModelMixin) and word in name):
        raise ModelError(f"{field}: {source} is not a diffusers {word} folder (config.json names {name!r})")
    return name


def locate(source: str, storage_spec: StorageSpec | None, field: str = "controlnet") -> Path:
    """A ControlNet's or T2I-Adapter's local folder (copied once per node for a remote one; a
    trained built-in, builtin:NAME, ships in the package), checked."""
    from pipeline.models.resolve import BUILTIN_PREFIX, TRAINED_DIR, locate

    shipped = TRAINED_DIR / source.removeprefix(BUILTIN_PREFIX)
    if source.startswith(BUILTIN_PREFIX) and (shipped / "config.json").is_file():
        folder = shipped
    else:
        folder = locate(source, storage_spec, None, None)
    config = folder / "config.json"
    files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    _check_folder(field, source, files, json.loads(config.read_text()) if config.is_file() else None)
    return folder


def _sources(stage: StageSpec) -> list[tuple[str, str]]:
    """(field, source) of each ControlNet or T2I-Adapter of the stage."""
    return [("controlnet", s) for s in stage.controlnet] + ([("t2i_adapter", stage.t2i_adapter)]
                                                             if stage.t2i_adapter else [])


def _types(folder: Path, name: str) -> int | None:
    """How many control types the ControlNet in ``folder`` (of diffusers class ``name``) tells apart:
    a ControlNet Union's (SDXL's ControlNetUnionModel; a FluxControlNetModel with num_mode, as
    InstantX's FLUX.1 Union); None for another ControlNet."""
    if name == UNION:
        return _config(folder).get("num_control_type", 6)
    return _config(folder).get("num_mode")


def check(stage: StageSpec, model_index: dict, storage_spec: StorageSpec | None) -> None:
    """On the driver: each ControlNet or T2I-Adapter can be fetched and is a folder of its kind,
    and `control_mode` is set for a ControlNet Union alone, with types it has (exit 2 if not)."""
    folders = {source: locate(source, storage_spec, field) for field, source in _sources(stage)}
    # Per ControlNet, its class and number of control types; a saved Union pipeline's types are
    # checked by diffusers as it runs.
    if stage.controlnet:
        classes = [model_class(folders[source]) for source in stage.controlnet]
        types = [_types(folders[source], name) for source, name in zip(stage.controlnet, classes)]
    else:
        classes = _held_classes(model_index)
        types = [0 if name == UNION else None for name in classes]
    what = stage.controlnet[0] if stage.controlnet else f"the model's own ControlNet ({stage.model})"
    if all(count is None for count in types):
        if stage.control_mode:
            raise ModelError(f"control_mode: applies to a ControlNet Union ({UNION}, or a FluxControlNetModel with "
                             f"num_mode); {what} is a {', '.join(classes) or 'stage without a ControlNet'}")
        return
    if len(types) > 1:
        raise ModelError(f"controlnet: a ControlNet Union runs alone in a stage (it reads several control images "
                         f"itself); this stage has {len(classes)} ControlNets")
    if not stage.control_mode:
        raise ModelError(f"control_mode: {what} is a ControlNet Union: give the control type of each control "
                         "image (control_image, control_image_2, ...)")
    bad = [mode for mode in stage.control_mode if types[0] and mode >= types[0]]
    if bad:
        raise ModelError(f"control_mode: {bad} are not control types of {what} (it has {types[0]}: 0 to "
                         f"{types[0] - 1})")
    if classes[0] != UNION and len(stage.control_mode) > 1:
        raise ModelError(f"control_mode: {what} is a FLUX.1 Union ControlNet, which reads one control image: give "
                         f"one type, not {len(stage.control_mode)}")


def load(stage: StageSpec, storage_spec: StorageSpec | None, dtype) -> dict:
    """The from_pretrained argument that gives the pipeline the stage's ControlNet(s) or
    T2I-Adapter; {} when the model's own ControlNet (a saved ControlNet pipeline) is used."""
    import diffusers

    models = []
    for field, source in _sources(stage):
        folder = locate(source, storage_spec, field)
        name = model_class(folder)
        models.append(getattr(diffusers, name).from_pretrained(folder, torch_dtype=dtype, use_safetensors=True,
                                                               local_files_only=True))
    if not models:
        return {}
    if stage.t2i_adapter:
        return {"adapter": models[0]}
    return {"controlnet": models[0] if len(models) == 1 else models}


# How a pipeline takes several ControlNets' images (diffusers differs): SD 1.x's text-to-image one
# nested per row (it transposes them); these only one image per ControlNet, which every row of the
# call then shares (rows are grouped by their control images: shares_controls); the others one list
# of the rows' images per ControlNet.
PER_ROW = {"StableDiffusionControlNetPipeline"}
ONE_PER_CONTROLNET = {"StableDiffusionControlNetImg2ImgPipeline", "StableDiffusionControlNetInpaintPipeline",
                      "StableDiffusionXLControlNetPipeline", "StableDiffusionXLControlNetImg2ImgPipeline",
                      "StableDiffusionXLControlNetInpaintPipeline"}
# The pipelines that take one ControlNet: diffusers builds no multi-ControlNet from a list for them.
SINGLE = {"QwenImageControlNetPipeline", "QwenImageControlNetInpaintPipeline", "ZImageControlNetPipeline",
          "ZImageControlNetInpaintPipeline"}


def shares_controls(pipeline: str, stage: StageSpec) -> bool:
    """Whether the rows of one call must share their control images."""
    return pipeline in ONE_PER_CONTROLNET and len(stage.controlnet) > 1


def several_problem(pipeline: str, stage: StageSpec) -> str | None:
    """Why ``stage`` cannot run ``pipeline`` with its ControlNets, or None."""
    if pipeline in SINGLE and len(stage.controlnet) > 1:
        return f"controlnet: {pipeline} takes one ControlNet; this stage has {len(stage.controlnet)}"
    return None


# The pipelines that encode the control image with the VAE drawing from torch's global generator
# (latent_dist.sample() without the call's generators): shardgen seeds it per call (stage.py).
GLOBAL_RNG = {"StableDiffusion3ControlNetPipeline", "StableDiffusion3ControlNetInpaintingPipeline",
              "QwenImageControlNetInpaintPipeline", "HunyuanDiTControlNetPipeline"}


def call_args(pipeline: str, takes: set[str], stage: StageSpec, controls: list[list], scale: float,
              masks: list | None) -> dict:
    """The arguments of ``pipeline`` for one call: ``controls`` holds per ControlNet the rows'
    images; ``masks`` the rows' masks on an inpainting stage."""
    if stage.t2i_adapter:  # diffusers' adapter pipelines take the control image as `image`
        return {"image": controls[0], "adapter_conditioning_scale": scale}
    # The text-to-image pipelines take the control image as `image`; the others, whose `image` is
    # the picture to change, as `control_image`.
    name = "control_image" if "control_image" in takes else "image"
    start_end = {"control_guidance_start": stage.control_start, "control_guidance_end": stage.control_end}
    if pipeline in UNION_CLASSES:  # an SDXL ControlNet Union: per control image, the rows' images, and its type
        return {name: controls, "control_mode": list(stage.control_mode), "controlnet_conditioning_scale": scale,
                **start_end}
    several = len(controls) > 1
    if not several:
        images = controls[0]
    elif pipeline in PER_ROW:
        images = [list(row) for row in zip(*controls)]
    elif pipeline in ONE_PER_CONTROLNET:
        images = [per_row[0] for per_row in controls]
    else:
        images = controls
    args = {name: images,
            "controlnet_conditioning_scale": [scale] * len(controls) if several else scale, **start_end}
    if stage.control_mode:  # a FLUX.1 Union ControlNet: the type of its one control image
        args["control_mode"] = stage.control_mode[0]
    if "control_mask" in takes:
        # SD3's and Qwen-Image's inpainting ControlNets repaint from noise: they see the control
        # image with the row's mask blanked out (white: repaint), and take no `image` or `strength`.
        args["control_mask"] = masks
    # Only what the pipeline takes: the driver refused a setting it lacks (settings_problem).
    return {name: value for name, value in args.items() if name in takes}
