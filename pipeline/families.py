"""The model families: for each kind of diffusers pipeline, which stage kinds it serves and with
which pipeline class, how its prompts become embeddings that a later stage may reuse, and what
differs between families (guidance semantics, T5 sequence length, SDXL's size micro-conditioning,
PixArt's resolution binning, the native size and the multiple a size must be of).

Two sources: the families written out here (``FAMILIES``, found first), and any other pipeline
class in diffusers' AutoPipeline mappings, whose class for each stage kind is the mapping's entry of
the same key (``AUTO_MAPPINGS``); ``MAPPED`` holds what differs for the mapped families shardgen
was tested with. Everything else is the generic path in pipeline/stages/base.py: prompts passed as
text, standard arguments passed where the pipeline's ``__call__`` takes them.

Detection reads only model_index.json, so the driver can refuse a model that no stage of its kind
can run before any actor starts (``check_family``). The encoders and call arguments take a loaded
pipeline; they import torch lazily through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.errors import ModelError

# A prompt encoder: (pipeline, prompts, negative prompts, device, stage spec) -> the pipeline's
# embedding arguments, each a tensor with one row per prompt.
Encoder = Callable[[Any, list[str], list[str], Any, Any], dict[str, Any]]


def _encode_sd(pipe, prompts, negatives, device, spec):
    positive, negative = pipe.encode_prompt(prompts, device, 1, True, negatives)
    return {"prompt_embeds": positive, "negative_prompt_embeds": negative}


def _encode_sdxl(pipe, prompts, negatives, device, spec):
    # A row without a negative prompt gets zeros where the config asks (force_zeros_for_empty_prompt),
    # as a plain diffusers call without one does, so that rows with and without one share a call.
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    out = dict(zip(names, pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                             do_classifier_free_guidance=True,
                                             negative_prompt=negatives if any(negatives) else None)))
    empty = [k for k, negative in enumerate(negatives) if not negative]
    if any(negatives) and empty and pipe.config.get("force_zeros_for_empty_prompt", False):
        for name in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            out[name][empty] = 0
    return out


def _encode_sd3(pipe, prompts, negatives, device, spec):
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    out = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
                             do_classifier_free_guidance=True, negative_prompt=negatives,
                             max_sequence_length=sequence_length(spec, 256))
    return dict(zip(names, out))


def _encode_flux(pipe, prompts, negatives, device, spec):
    length = sequence_length(spec, 512)
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, max_sequence_length=length)
    out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if spec.true_cfg_scale:  # FLUX.1 has no negative embeddings unless true CFG asks for them
        embeds, pooled, _ = pipe.encode_prompt(prompt=negatives, prompt_2=None, device=device,
                                               max_sequence_length=length)
        out |= {"negative_prompt_embeds": embeds, "negative_pooled_prompt_embeds": pooled}
    return out


def _encode_if(pipe, prompts, negatives, device, spec):
    # DeepFloyd IF stages I and II share one T5-XXL: stage II reuses stage I's embeddings.
    positive, negative = pipe.encode_prompt(prompts, True, 1, device, negatives, clean_caption=False)
    return {"prompt_embeds": positive, "negative_prompt_embeds": negative}


def sequence_length(spec, default: int) -> int:
    return spec.max_sequence_length or default


def _sdxl_args(pipe, spec, width, height):
    # Micro-conditioning: tell SDXL the image is meant at this size, uncropped.
    return {"original_size": (height, width), "target_size": (height, width)}


def _flux_args(pipe, spec, width, height):
    args: dict[str, Any] = {"max_sequence_length": sequence_length(spec, 512)}
    if spec.true_cfg_scale:
        args["true_cfg_scale"] = spec.true_cfg_scale
    return args


def _sd3_args(pipe, spec, width, height):
    return {"max_sequence_length": sequence_length(spec, 256)}


def _kontext_args(pipe, spec, width, height):
    # Kontext would generate at max_area (1024x1024's pixels) and snap the input image to its
    # preferred resolutions: the asked size is its area, the image is taken as it is.
    return {"max_area": width * height, "_auto_resize": False}


# The sample sizes PixArt-Σ has aspect-ratio bins for (1024px models: 128).
PIXART_BINNED_SAMPLE_SIZES = (32, 64, 128, 256)


def _pixart_args(pipe, spec, width, height):
    # Resolution binning: generate at the trained aspect-ratio bin nearest to the request, then
    # resize to it. Models without bins (other sample sizes) generate at the size asked for.
    return {"use_resolution_binning": pipe.transformer.config.sample_size in PIXART_BINNED_SAMPLE_SIZES,
            "clean_caption": False, "max_sequence_length": sequence_length(spec, 300)}


def _flux_guidance(pipe) -> str:
    return "embedded" if pipe.transformer.config.guidance_embeds else "none (guidance-distilled)"


def _guidance(pipe) -> str:
    """What guidance_scale means to a pipeline of the generic path."""
    transformer = getattr(pipe, "transformer", None)
    if getattr(getattr(transformer, "config", None), "guidance_embeds", False):
        return "embedded"
    if getattr(pipe.config, "is_distilled", False):  # FLUX.2 [klein] distilled
        return "none (guidance-distilled)"
    return "classifier-free"


def _true_cfg_guidance(pipe) -> str:
    return "classifier-free (as true_cfg_scale)"


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    pipelines: dict[str, str]  # stage kind -> diffusers pipeline class
    detect: Callable[[dict], bool] | None  # from model_index.json; None: by the AutoPipeline mappings
    native_size: int | None  # the side it was trained at, in pixels; None: not known
    encode: Encoder | None = None  # None: pass prompts and let the pipeline encode them
    args: Callable[[Any, Any, int, int], dict] | None = None  # family call arguments
    guidance: Callable[[Any], str] = field(default=lambda pipe: "classifier-free")
    scale: int = 1  # super-resolution factor
    multiple: int = 8  # width and height must be multiples of this (VAE factor x patch size)
    output_type: str = "pt"  # "pt": a float tensor in [0, 1]; "np" where "pt" is not that (DeepFloyd IF)
    # A standard call argument the family's pipeline takes under other names (combined prior +
    # decoder pipelines take the steps twice; Qwen-Image's classifier-free scale is true_cfg_scale).
    renames: dict[str, tuple[str, ...]] = field(default_factory=dict)
    references: bool = False  # image_to_image takes a list of images: the row's image and its reference_images

    def call_args(self, pipe, spec, width: int, height: int) -> dict:
        return self.args(pipe, spec, width, height) if self.args else {}


def _class_in(*names: str) -> Callable[[dict], bool]:
    return lambda index: index.get("_class_name") in names


def has_component(index: dict, name: str) -> bool:
    """Whether model_index.json lists the component ``name`` (a [library, class] pair, not nulls)."""
    value = index.get(name)
    return isinstance(value, list) and len(value) == 2 and value[0] is not None


def _sdxl_base(index: dict) -> bool:
    return index.get("_class_name") in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline") \
        and has_component(index, "text_encoder")


def _sdxl_refiner(index: dict) -> bool:
    # The refiner has only the second (OpenCLIP) text encoder and aesthetic-score conditioning.
    return index.get("_class_name") in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline") \
        and not has_component(index, "text_encoder")


FAMILIES: tuple[Family, ...] = (
    Family("sd", "Stable Diffusion 1.x/2.x",
           {"text_to_image": "StableDiffusionPipeline", "image_to_image": "StableDiffusionImg2ImgPipeline",
            "inpainting": "StableDiffusionInpaintPipeline"},
           _class_in("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"), 512, _encode_sd),
    Family("sd-inpaint", "Stable Diffusion inpainting (9-channel)",
           {"inpainting": "StableDiffusionInpaintPipeline"}, _class_in("StableDiffusionInpaintPipeline"), 512,
           _encode_sd),
    Family("sdxl", "SDXL",
           {"text_to_image": "StableDiffusionXLPipeline", "image_to_image": "StableDiffusionXLImg2ImgPipeline",
            "inpainting": "StableDiffusionXLInpaintPipeline"}, _sdxl_base, 1024, _encode_sdxl, _sdxl_args),
    Family("sdxl-refiner", "SDXL refiner", {"image_to_image": "StableDiffusionXLImg2ImgPipeline"}, _sdxl_refiner,
           1024, _encode_sdxl, _sdxl_args),
    Family("sdxl-inpaint", "SDXL inpainting", {"inpainting": "StableDiffusionXLInpaintPipeline"},
           _class_in("StableDiffusionXLInpaintPipeline"), 1024, _encode_sdxl, _sdxl_args),
    Family("sd3", "Stable Diffusion 3/3.5",
           {"text_to_image": "StableDiffusion3Pipeline", "image_to_image": "StableDiffusion3Img2ImgPipeline",
            "inpainting": "StableDiffusion3InpaintPipeline"},
           _class_in("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
           1024, _encode_sd3, _sd3_args),
    Family("flux", "FLUX.1",
           {"text_to_image": "FluxPipeline", "image_to_image": "FluxImg2ImgPipeline",
            "inpainting": "FluxInpaintPipeline"},
           _class_in("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"), 1024, _encode_flux, _flux_args,
           _flux_guidance),
    Family("flux-fill", "FLUX.1 Fill", {"inpainting": "FluxFillPipeline"}, _class_in("FluxFillPipeline"), 1024,
           _encode_flux, _flux_args, _flux_guidance),
    Family("pixart-sigma", "PixArt-Σ", {"text_to_image": "PixArtSigmaPipeline"}, _class_in("PixArtSigmaPipeline"),
           1024, None, _pixart_args),
    Family("sd-x4-upscaler", "SD x4 upscaler", {"super_resolution": "StableDiffusionUpscalePipeline"},
           _class_in("StableDiffusionUpscalePipeline"), 512, _encode_sd, scale=4),
    Family("sd-latent-upscaler", "SD latent x2 upscaler",
           {"super_resolution": "StableDiffusionLatentUpscalePipeline"},
           _class_in("StableDiffusionLatentUpscalePipeline"), 1024, scale=2),
    # The scheduler is the stage's: DDPMPipeline runs whichever scheduler it is given (DDPM, DDIM, ...).
    Family("ddpm", "DDPM/DDIM (pixel space)", {"unconditional": "DDPMPipeline"},
           _class_in("DDPMPipeline", "DDIMPipeline"), 256, guidance=lambda pipe: "none"),
    Family("ldm", "latent diffusion (LDMPipeline)", {"unconditional": "LDMPipeline"}, _class_in("LDMPipeline"), 256,
           guidance=lambda pipe: "none"),
    # DeepFloyd IF: stage I (64 px) through the mappings below; stage II upscales x4 with the same T5.
    Family("if-sr", "DeepFloyd IF stage II", {"super_resolution": "IFSuperResolutionPipeline"},
           _class_in("IFSuperResolutionPipeline"), 256, _encode_if, scale=4, output_type="np",
           guidance=lambda pipe: "classifier-free"),
    # Image pipelines outside diffusers' AutoPipeline mappings (Kolors is in them only where
    # sentencepiece is installed).
    Family("hidream", "HiDream-I1", {"text_to_image": "HiDreamImagePipeline"}, _class_in("HiDreamImagePipeline"),
           1024, multiple=16),
    Family("hunyuanimage", "HunyuanImage 2.1", {"text_to_image": "HunyuanImagePipeline"},
           _class_in("HunyuanImagePipeline"), 2048, multiple=32),
    Family("kolors", "Kolors", {"text_to_image": "KolorsPipeline", "image_to_image": "KolorsImg2ImgPipeline"},
           _class_in("KolorsPipeline", "KolorsImg2ImgPipeline"), 1024, args=_sdxl_args),
)

# The AutoPipeline mapping of each stage kind that diffusers has one for.
AUTO_MAPPINGS = {"text_to_image": "AUTO_TEXT2IMAGE_PIPELINES_MAPPING",
                 "image_to_image": "AUTO_IMAGE2IMAGE_PIPELINES_MAPPING",
                 "inpainting": "AUTO_INPAINT_PIPELINES_MAPPING"}
_TRUE_CFG = {"renames": {"guidance_scale": ("true_cfg_scale",)}, "guidance": _true_cfg_guidance}
_PRIOR_DECODER = {"renames": {"num_inference_steps": ("num_inference_steps", "prior_num_inference_steps"),
                              "guidance_scale": ("prior_guidance_scale",)}}
# What differs for the mapped families shardgen was tested with, by their mapping key; any other
# key gets the defaults (no native size, a multiple of 8, which the asked-size check backs up).
MAPPED: dict[str, Family] = {f.name: f for f in (
    Family("flux2", "FLUX.2 [dev]", {}, None, 1024, multiple=16, guidance=_guidance, references=True),
    Family("flux2-klein", "FLUX.2 [klein]", {}, None, 1024, multiple=16, guidance=_guidance, references=True),
    # FLUX.1 Canny/Depth [dev]: the transformer reads the control image's latents beside the noisy
    # ones (in_channels doubled), with no ControlNet (pipeline/conditioning/controlnet.py).
    Family("flux-control", "FLUX.1 Control", {}, None, 1024, _encode_flux, _flux_args, _flux_guidance,
           multiple=16),
    Family("flux-kontext", "FLUX.1 Kontext", {}, None, 1024, args=_kontext_args, multiple=16,
           guidance=_flux_guidance),
    Family("qwenimage", "Qwen-Image", {}, None, 1328, multiple=16, **_TRUE_CFG),
    Family("qwenimage-edit", "Qwen-Image-Edit", {}, None, 1024, multiple=16, **_TRUE_CFG),
    Family("qwenimage-edit-plus", "Qwen-Image-Edit-Plus", {}, None, 1024, multiple=16, references=True, **_TRUE_CFG),
    Family("z-image", "Z-Image", {}, None, 1024, multiple=16),
    Family("sana", "SANA", {}, None, 1024, multiple=32),
    Family("chroma", "Chroma", {}, None, 1024, multiple=16),
    Family("auraflow", "AuraFlow", {}, None, 1024, multiple=16),
    Family("lumina2", "Lumina 2", {}, None, 1024, multiple=16),
    Family("cogview4", "CogView4", {}, None, 1024, multiple=16),
    Family("hunyuan", "HunyuanDiT", {}, None, 1024, multiple=16),
    # Kandinsky 3 rounds a size up to a multiple of 64 (its MoVQ factor squared).
    Family("kandinsky3", "Kandinsky 3", {}, None, 1024, multiple=64),
    Family("cascade", "Stable Cascade", {}, None, 1024, multiple=128, **_PRIOR_DECODER),
    Family("wuerstchen", "Würstchen", {}, None, 1024, multiple=128, **_PRIOR_DECODER),
    Family("if", "DeepFloyd IF stage I", {}, None, 64, _encode_if, output_type="np"),
    Family("pixart-alpha", "PixArt-α", {}, None, 1024, multiple=16),
)}


def _auto_mappings() -> dict[str, dict]:
    """Stage kind -> diffusers' AutoPipeline mapping (key -> pipeline class). Imported here, on
    demand: the mappings import every pipeline, which only a model outside FAMILIES needs."""
    from diffusers.pipelines import auto_pipeline

    return {kind: getattr(auto_pipeline, name) for kind, name in AUTO_MAPPINGS.items()}


def _auto_family(class_name: str) -> Family | None:
    """The family of a pipeline class in diffusers' AutoPipeline mappings: for each stage kind, the
    class that the kind's mapping holds under the same key (as AutoPipelineFor* picks it)."""
    mappings = _auto_mappings()
    key = next((key for mapping in mappings.values() for key, cls in mapping.items()
                if cls.__name__ == class_name), None)
    if key is None:
        return None
    pipelines = {kind: mapping[key].__name__ for kind, mapping in mappings.items() if key in mapping}
    known = MAPPED.get(key)
    if known is not None:
        return replace(known, pipelines=pipelines, detect=_class_in(class_name))
    return Family(key, f"{key} (through diffusers' AutoPipeline mappings)", pipelines, _class_in(class_name), None,
                  guidance=_guidance)


def family_of(model_index: dict) -> Family | None:
    from pipeline.conditioning.controlnet import base_index  # a saved ControlNet pipeline: its base family

    index = base_index(model_index)
    family = next((f for f in FAMILIES if f.detect(index)), None)
    if family is None and index.get("_class_name"):
        family = _auto_family(index["_class_name"])
    return family


def families_for(kind: str) -> list[Family]:
    return [f for f in FAMILIES if kind in f.pipelines]


def size_problem(family: Family, width: int, height: int) -> str | None:
    """Why ``width`` x ``height`` cannot be asked of ``family``, or None. Pipelines round such a
    size down or up without a word; shardgen refuses it instead."""
    for name, value in (("width", width), ("height", height)):
        if value % family.multiple:
            low = value // family.multiple * family.multiple
            return (f"{name}: {value} is not a multiple of {family.multiple}, which {family.title} needs "
                    f"(try {max(low, family.multiple)} or {low + family.multiple})")
    return None


def size_warning(family: Family, width: int, height: int) -> str | None:
    """A line when ``width`` x ``height`` is far from the family's native size (under half or over
    twice), where images come out worse than the model can make; else None."""
    native = family.native_size
    if native is None or all(native / 2 <= side <= native * 2 for side in (width, height)):
        return None
    return (f"{width}x{height} is far from {family.title}'s native {native}x{native} (under half or over "
            "twice): expect worse images")


def check_family(source: str, model_index: dict, stage) -> Family:
    """The family of the model at ``source`` for ``stage`` (a StageSpec), or ModelError (exit 2)
    naming its pipeline class, the stage kind and the families that kind supports."""
    family = family_of(model_index)
    kind = stage.kind
    if family is None or kind not in family.pipelines:
        what = f"the {family.title} family" if family else "no family shardgen knows"
        served = f" (it serves {', '.join(family.pipelines)})" if family else ""
        auto = " and the pipelines of diffusers' AutoPipeline mappings" if kind in AUTO_MAPPINGS else ""
        raise ModelError(
            f"model: {source} is a {model_index.get('_class_name')} ({what}){served}; {kind} stages run "
            f"{', '.join(f.title for f in families_for(kind))}{auto}")
    refused = None if any(f.name == family.name for f in FAMILIES) else _refused(family.pipelines[kind])
    if refused:
        raise ModelError(f"model: {source}: {family.pipelines[kind]} ({family.title}) {refused}")
    if stage.true_cfg_scale and "true_cfg_scale" not in _call_parameters(family.pipelines[kind]):
        raise ModelError(f"true_cfg_scale: {family.pipelines[kind]} ({family.title}) has no true classifier-free "
                         f"guidance; leave true_cfg_scale unset for model {source}")
    if stage.safety_checker == "filter" and not has_component(model_index, "safety_checker"):
        raise ModelError(f"safety_checker: filter runs the safety checker a model ships, and {source} "
                         f"({model_index.get('_class_name')}) ships none; leave safety_checker off")
    from pipeline.conditioning.controlnet import model_control_problem
    from pipeline.stages import speed

    problem = model_control_problem(family.pipelines[kind], stage, model_index) or speed.check(stage, model_index)
    if problem:
        raise ModelError(f"{problem} (model {source})")
    return family


def _refused(class_name: str) -> str | None:
    """Why a pipeline that the mappings give cannot run as a plain stage, or None: one that needs an
    input no stage gives it (a control image, a control net), except those whose model reads the
    row's control image itself (FLUX.1 Control)."""
    import inspect

    import diffusers

    from pipeline.conditioning.controlnet import MODEL_CONTROL

    signature = inspect.signature(getattr(diffusers, class_name).__init__).parameters
    if class_name in MODEL_CONTROL:
        return None
    if "controlnet" in signature or "control_image" in _call_parameters(class_name):
        return "needs a control image; a stage's `controlnet:` runs ControlNets with the families written out"
    return None


def _call_parameters(class_name: str) -> set[str]:
    import inspect

    import diffusers

    return set(inspect.signature(getattr(diffusers, class_name).__call__).parameters)

