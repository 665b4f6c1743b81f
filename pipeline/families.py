"""The model families: for each kind of diffusers pipeline, which stage kinds it serves and with
which pipeline class, how its prompts become embeddings that a later stage may reuse, and the call
arguments that differ between families (guidance semantics, T5 sequence length, SDXL's size
micro-conditioning, PixArt's resolution binning).

Detection reads only model_index.json, so the driver can refuse a model that no stage of its kind
can run before any actor starts (``check_family``). The encoders and call arguments take a loaded
pipeline; they import torch lazily through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
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


# The sample sizes PixArt-Σ has aspect-ratio bins for (1024px models: 128).
PIXART_BINNED_SAMPLE_SIZES = (32, 64, 128, 256)


def _pixart_args(pipe, spec, width, height):
    # Resolution binning: generate at the trained aspect-ratio bin nearest to the request, then
    # resize to it. Models without bins (other sample sizes) generate at the size asked for.
    return {"use_resolution_binning": pipe.transformer.config.sample_size in PIXART_BINNED_SAMPLE_SIZES,
            "clean_caption": False, "max_sequence_length": sequence_length(spec, 300)}


def _flux_guidance(pipe) -> str:
    return "embedded" if pipe.transformer.config.guidance_embeds else "none (guidance-distilled)"


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    pipelines: dict[str, str]  # stage kind -> diffusers pipeline class
    detect: Callable[[dict], bool]  # from model_index.json
    native_size: int  # the side it was trained at, in pixels
    encode: Encoder | None = None  # None: pass prompts and let the pipeline encode them
    args: Callable[[Any, Any, int, int], dict] | None = None  # family call arguments
    guidance: Callable[[Any], str] = field(default=lambda pipe: "classifier-free")
    scale: int = 1  # super-resolution factor

    def call_args(self, pipe, spec, width: int, height: int) -> dict:
        return self.args(pipe, spec, width, height) if self.args else {}


def _class_in(*names: str) -> Callable[[dict], bool]:
    return lambda index: index.get("_class_name") in names


def _component(index: dict, name: str) -> bool:
    value = index.get(name)
    return isinstance(value, list) and len(value) == 2 and value[0] is not None


def _sdxl_base(index: dict) -> bool:
    return index.get("_class_name") in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline") \
        and _component(index, "text_encoder")


def _sdxl_refiner(index: dict) -> bool:
    # The refiner has only the second (OpenCLIP) text encoder and aesthetic-score conditioning.
    return index.get("_class_name") in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline") \
        and not _component(index, "text_encoder")


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
)


def family_of(model_index: dict) -> Family | None:
    from pipeline.conditioning.controlnet import base_index  # a saved ControlNet pipeline: its base family

    index = base_index(model_index)
    return next((f for f in FAMILIES if f.detect(index)), None)


def families_for(kind: str) -> list[Family]:
    return [f for f in FAMILIES if kind in f.pipelines]


def check_family(source: str, model_index: dict, stage) -> Family:
    """The family of the model at ``source`` for ``stage`` (a StageSpec), or ModelError (exit 2)
    naming its pipeline class, the stage kind and the families that kind supports."""
    family = family_of(model_index)
    kind = stage.kind
    if family is None or kind not in family.pipelines:
        what = f"the {family.title} family" if family else "no family shardgen knows"
        served = f" (it serves {', '.join(family.pipelines)})" if family else ""
        raise ModelError(
            f"model: {source} is a {model_index.get('_class_name')} ({what}){served}; {kind} stages run "
            f"{', '.join(f.title for f in families_for(kind))}")
    if stage.true_cfg_scale and "true_cfg_scale" not in _call_parameters(family.pipelines[kind]):
        raise ModelError(f"true_cfg_scale: {family.pipelines[kind]} ({family.title}) has no true classifier-free "
                         f"guidance; leave true_cfg_scale unset for model {source}")
    from pipeline.stages import speed

    problem = speed.check(stage, model_index)
    if problem:
        raise ModelError(f"{problem} (model {source})")
    return family


def _call_parameters(class_name: str) -> set[str]:
    import inspect

    import diffusers

    return set(inspect.signature(getattr(diffusers, class_name).__call__).parameters)

