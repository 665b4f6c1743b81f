"""The job spec: what to read, which stages to run, where and how to write. Every field has a
description; `shardgen spec --schema` prints them as a JSON Schema."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline import dates
from pipeline.errors import SpecError
from pipeline.kinds import KINDS

StageKind = Literal[tuple(KINDS)]  # type: ignore[valid-type]
SchedulerName = Literal["ddpm", "ddim", "pndm", "euler", "euler_a", "dpm++", "unipc"]

# A stage without `model` runs the trained built-in of its kind, never a random-weight one: the
# tiny-* built-ins draw noise and run only when named.
DEFAULT_MODELS: dict[str, str] = {
    "text_to_image": "builtin:shapes-t2i",
    "super_resolution": "builtin:shapes-sr",
    "inpainting": "builtin:shapes-inpaint",
    "image_to_image": "builtin:shapes-t2i",
}
# Settings a built-in model was trained for, applied to the stage fields a spec leaves unset
# (other models keep the plain defaults). `shardgen validate` shows which ones it applied.
RECOMMENDED: dict[str, dict[str, Any]] = {
    "builtin:shapes-t2i": {"guidance_scale": 4.0, "width": 32, "height": 32},
    "builtin:shapes-sr": {"guidance_scale": 1.0, "noise_level": 20},
    # Trained and measured repainting the whole mask from noise (docs/trained-models.md): at the
    # stages' default strength 0.75 the old shape's outline shows through and wins.
    "builtin:shapes-inpaint": {"guidance_scale": 4.0, "strength": 1.0},
}
# `batch_size: auto`: the largest batch a GPU actor's probe tries (a power of two, so that every
# size it settles on, halvings included, divides the plan's batches of this many rows), and the
# size of actors that do not probe.
AUTO_MAX_BATCH = 64
AUTO_START_BATCH = 8
# Built-ins with random weights: they prove the plumbing and draw noise.
NOISE_MODEL_PREFIX = "builtin:tiny-"
# The manifest columns shardgen reads by name; `columns:` maps them to a manifest's own names.
ManifestColumn = Literal["id", "task", "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width",
                         "height", "strength", "image", "mask", "control_image", "controlnet_scale", "lora",
                         "reference_images", "reference_image"]
# The stage kinds a ControlNet can condition (diffusers has ControlNet pipelines for each).
CONTROLNET_KINDS = ("text_to_image", "image_to_image", "inpainting")
# IP-Adapters condition the same kinds; diffusers' T2I-Adapter pipelines only make images from text.
IP_ADAPTER_KINDS = CONTROLNET_KINDS
T2I_ADAPTER_KINDS = ("text_to_image",)
# The manifest columns that set a generation parameter per row. Opt-in: a caption set's `width` is
# the photo's size, not the size to generate at.
OverrideColumn = Literal["steps", "guidance_scale", "strength", "width", "height"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StorageSpec(_Strict):
    """Object storage options. Unset fields fall back to the usual AWS_* variables."""

    endpoint_url: str | None = Field(default=None, description="an S3-compatible endpoint (MinIO, R2, moto); "
                                     "unset: AWS_ENDPOINT_URL or AWS's own")
    key: SecretStr | None = Field(default=None, description="access key id (a secret: never printed or written); "
                                  "unset: AWS_ACCESS_KEY_ID or the usual AWS credential chain")
    secret: SecretStr | None = Field(default=None, description="secret access key (a secret); unset: "
                                     "AWS_SECRET_ACCESS_KEY")
    token: SecretStr | None = Field(default=None, description="session token (a secret); unset: AWS_SESSION_TOKEN")
    region: str | None = Field(default=None, description="the bucket's region; unset: AWS_DEFAULT_REGION")
    anon: bool = Field(default=False, description="read public buckets without credentials")
    allowed_prefixes: list[str] = Field(
        default=[],
        description="where manifest image and mask URIs may point besides the manifest's own bucket or folder",
    )
    max_attempts: Annotated[int, Field(ge=1, le=100)] = Field(
        default=10,
        description="tries per S3 request, the first included, on throttling (503 SlowDown), 5xx errors and "
        "dropped connections, with exponential backoff; overrides AWS_MAX_ATTEMPTS",
    )
    retry_mode: Literal["standard", "adaptive"] = Field(
        default="standard",
        description="botocore's retry mode: adaptive also slows the client down while S3 throttles it; "
        "overrides AWS_RETRY_MODE",
    )

    @field_validator("allowed_prefixes")
    @classmethod
    def _absolute_prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            if "://" not in prefix and not prefix.startswith(("/", "~")):
                raise ValueError(f"{prefix!r} is neither a URI (s3://bucket/...) nor an absolute path")
        return value


class CacheSpec(_Strict):
    """A stage's cache of the denoiser's work between steps."""

    method: Literal["first_block"] = Field(
        default="first_block",
        description="first_block: run the transformer's first block each step and skip the others when its output "
        "changed less than threshold since the last full step (diffusers' FirstBlockCache, the generic form of "
        "TeaCache)")
    threshold: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.05, description="the relative change of the first block's output under which a step reuses the "
        "cached rest: higher is faster and further from the uncached image (diffusers' default: 0.05)")


class LoraSpec(_Strict):
    """One LoRA adapter of a stage, from the same kinds of source as a model."""

    source: str = Field(description="a local .safetensors file or folder, an s3:// file or folder, or a Hugging "
                        "Face Hub id (org/name); safetensors only")
    weight_name: str | None = Field(default=None, description="the .safetensors file inside a folder or hub repo "
                                    "that holds several; null: the only one there")
    scale: float = Field(default=1.0, description="how strongly the adapter applies; 0 gives the base model's "
                         "images exactly")
    name: str | None = Field(default=None, description="a name that the manifest's `lora` column picks the "
                             "adapter by; null: the adapter applies to every row")
    revision: str | None = Field(default=None, description="for a hub id: a branch, tag or commit hash; "
                                 "null: main")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or "," in value or value != value.strip()):
            raise ValueError(f"{value!r}: a name is non-empty, without commas or surrounding spaces")
        return value


class ControlSpec(_Strict):
    """A control image computed from the row's own image on CPU before the GPU stages."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: Literal["image"] = Field(default="image", alias="from", description="the manifest column it is "
                                    "computed from")
    kind: Literal["canny"] = Field(description="canny: OpenCV's Canny edges, white on black (needs the "
                                   "`control` extra: opencv-python-headless)")
    low_threshold: Annotated[int, Field(ge=0, le=1000)] = Field(default=100, description="canny: the lower "
                                                                "hysteresis threshold on the gradient")
    high_threshold: Annotated[int, Field(ge=0, le=1000)] = Field(default=200, description="canny: the upper "
                                                                 "hysteresis threshold on the gradient")


class StageSpec(_Strict):
    """One diffusion stage: the model it runs, its parameters, and the actor pool that runs it."""

    kind: StageKind = Field(description="what the stage does: text_to_image | image_to_image | inpainting | "
                            "super_resolution | unconditional")
    model: str = Field(default="", description="builtin:NAME, a local folder, an s3:// folder or a Hugging Face Hub "
                       "id (org/name); unset: the kind's trained built-in (builtin:shapes-t2i, shapes-sr, "
                       "shapes-inpaint); unconditional has none and needs a model")
    revision: str | None = Field(
        default=None, description="for a hub id: a branch, tag or commit hash (a commit pins the model); null: main"
    )
    variant: str | None = Field(
        default=None, description="for a hub id: the weights variant to download, e.g. fp16 (files named "
        "*.fp16.safetensors); null: the plain weights"
    )
    scheduler: SchedulerName | None = Field(default=None, description="null keeps the model's own scheduler")
    # Upper bounds for steps, width and height are the job's `limits`, checked by JobSpec.
    steps: Annotated[int, Field(ge=1)] = Field(default=20, description="denoising steps")
    guidance_scale: Annotated[float, Field(ge=0, le=50)] = Field(
        default=7.5, description="classifier-free guidance; 1 turns it off (unset: the built-in model's "
        "recommended value, else 7.5)")
    width: Annotated[int, Field(ge=8, multiple_of=8)] = Field(
        default=64, description="text_to_image: image width in pixels (unset: the built-in's size, else 64)")
    height: Annotated[int, Field(ge=8, multiple_of=8)] = Field(
        default=64, description="text_to_image: image height in pixels (unset: the built-in's size, else 64)")
    strength: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.75, description="inpainting, image_to_image: how much of the input image is repainted")
    noise_level: Annotated[int, Field(ge=0, le=1000)] = Field(
        default=20, description="super_resolution: how much the low-res image is noised before guiding the upscaler")
    batch_size: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = Field(
        default="auto", description="rows per pipeline call of an actor. auto: on a GPU, the largest power of two up "
        f"to {AUTO_MAX_BATCH} whose call at the stage's size fits in memory, found by a one-step probe as the actor "
        f"starts (kinds that take an image start at {AUTO_START_BATCH}); on a CPU, {AUTO_START_BATCH}. A call that "
        "runs out of memory halves its actor's batch size for the rest of the job (_stats.json: batch_size, "
        "probed_batch_size, batch_halvings)")
    actors: tuple[int, int] = Field(default=(1, 1), description="min and max actors of the stage's pool (an int: "
                                    "a fixed pool); unset on a cluster with GPUs: a fixed pool over an even share "
                                    "of the GPUs the other stages leave")
    gpus_per_actor: Annotated[float, Field(ge=0, le=8)] | None = Field(
        default=None, description="null: 1 when the cluster has GPUs, else 0; fractions share a GPU; a whole "
        "number from 2 to 8 places one pipeline across that many GPUs of a node (diffusers' device_map "
        "\"balanced\"), for models bigger than one GPU"
    )
    # Left unset (or null), the plan fits it to the cluster (plan.fit_resources); 1 is what an actor
    # built outside a plan reserves.
    cpus_per_actor: Annotated[float, Field(gt=0)] = Field(
        default=1, description="CPUs each actor reserves, also torch's thread count on CPUs; unset or null: 1 "
        "on a cluster with GPUs, else the node's CPUs shared among the stages' actors")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="auto: bf16 (or fp16) on GPUs, fp32 on CPUs")
    batch_invariant: bool | None = Field(
        default=None,
        description="run the denoiser one row at a time so images never depend on batch size; "
        "null: on for CPUs, off for GPUs (where batching is what makes them fast)",
    )
    offload: Literal["none", "model", "group", "sequential"] = Field(
        default="none",
        description="where the weights wait between uses on a GPU: none keeps the whole pipeline on the GPU "
        "(fastest, needs the most memory); model moves one component (text encoder, denoiser, VAE) to the GPU "
        "at a time (diffusers' enable_model_cpu_offload: about the denoiser's size in GPU memory, a few "
        "percent slower); group streams groups of layers in, the next one loading while the current one runs "
        "(enable_group_offload, leaf level on a CUDA stream: near sequential's memory at a fraction of its "
        "slowdown); sequential streams each layer in when it runs (enable_sequential_cpu_offload: the "
        "least GPU memory, several times slower). CPU actors have nothing to offload and ignore it",
    )
    quantize: Literal["none", "int8_weight_only", "fp8_weight_only", "nf4"] = Field(
        default="none",
        description="quantize the denoiser and text encoders as they load (diffusers' PipelineQuantizationConfig): "
        "int8_weight_only (torchao: half of bf16's weight memory, runs on CPUs too), fp8_weight_only (torchao: "
        "half, GPUs of compute capability 8.9+), nf4 (bitsandbytes 4-bit: a quarter, GPUs only); none: the "
        "dtype's full weights. Needs the `quantize` extra (torchao) or bitsandbytes installed",
    )
    safety_checker: Literal["off", "filter"] = Field(
        default="off",
        description="a safety checker the model ships (SD 1.x, DeepFloyd IF), which turns the images it flags "
        "black: off does not load it and records \"safety_checker\": \"not run\" in every row's stage_params; "
        "filter runs it, and a row it flags becomes `status: filtered` with no image and the reason in `error` "
        "(counted in _stats.json). filter on a model that ships none is refused before the job starts",
    )
    compile: bool | Literal["regional"] = Field(
        default=False,
        description="true: torch.compile the denoiser and the VAE decoder when the actor starts, warmed up with one "
        "call at the stage's size and batch_size (kinds that take an image compile on their first batch); calls "
        "are then padded to batch_size so that shapes stay static. regional: compile only the denoiser's repeated "
        "blocks (diffusers' compile_repeated_blocks: U-Nets and FLUX.1; a fraction of the compile time). Off by "
        "default: it costs minutes per actor before the first image and pays back only on long runs "
        "(docs/performance.md)",
    )
    attention_backend: str | None = Field(
        default=None,
        description="diffusers' attention backend for the denoiser (set_attention_backend): native, flash, "
        "_native_cudnn, _native_flash, sage, flex, ...; only for denoisers that route attention through diffusers' "
        "dispatcher (FLUX.1); images differ within the backend's rounding. null: PyTorch's scaled dot-product "
        "attention",
    )
    cache: CacheSpec | None = Field(
        default=None,
        description="reuse the denoiser's work between steps where it barely changes (diffusers' cache hooks), for "
        "DiT families whose transformer takes them (FLUX.1): faster at a quality cost measured in "
        "docs/performance.md. null: off",
    )
    true_cfg_scale: Annotated[float, Field(ge=1, le=50)] | None = Field(
        default=None,
        description="FLUX.1 only: real classifier-free guidance with the negative prompt when above 1 (two "
        "transformer passes per step); guidance_scale stays FLUX.1-dev's embedded guidance. None: off",
    )
    max_sequence_length: Annotated[int, Field(ge=1, le=512)] | None = Field(
        default=None,
        description="T5 tokens a prompt may use, for families with a T5 text encoder (SD3: 256, FLUX.1: 512, "
        "PixArt-Σ: 300 when None); longer prompts are truncated by the tokenizer",
    )
    loras: list[LoraSpec] = Field(
        default=[], description="LoRA adapters loaded once per actor; unnamed ones are fused into the weights, "
        "named ones apply to the rows whose `lora` column names them (all of them when there is no such column)")
    controlnet: list[str] = Field(
        default=[], description="ControlNet model(s), each a source as for `model` (a list: multi-ControlNet); the "
        "row's control image is the manifest's `control_image` (the second ControlNet's `control_image_2`, ...) "
        "or made by `control`")
    controlnet_scale: Annotated[float, Field(ge=0, le=10)] = Field(
        default=1.0, description="how strongly the control image steers (diffusers' "
        "controlnet_conditioning_scale); a `controlnet_scale` manifest column overrides it per row")
    control_mode: list[Annotated[int, Field(ge=0)]] = Field(
        default=[], description="a ControlNet Union's control type of each control image, `control_image` first, "
        "as the Union model numbers them (SDXL's ControlNetUnionModel, xinsir/controlnet-union-sdxl-1.0: 0 openpose, "
        "1 depth, 2 hed/pidi/scribble/ted, 3 canny/lineart/anime_lineart/mlsd, 4 normal, 5 segment; its ProMax adds "
        "6 tile, 7 repaint): the one SDXL Union reads as many control images as this lists; a FLUX.1 Union "
        "ControlNet (FluxControlNetModel with num_mode) reads one, of one type. Required for a Union, refused for "
        "other ControlNets")
    control_start: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.0, description="the share of the denoising steps after which the ControlNet starts to apply")
    control_end: Annotated[float, Field(ge=0, le=1)] = Field(
        default=1.0, description="the share of the denoising steps after which the ControlNet stops applying")
    control: ControlSpec | None = Field(
        default=None, description="compute the (first) ControlNet's, the T2I-Adapter's or a FLUX.1 Control model's "
        "control image from the row's `image` instead of reading a `control_image` column")
    t2i_adapter: str | None = Field(
        default=None, description="a T2I-Adapter model (a T2IAdapter folder, a source as for `model`), instead of "
        "a ControlNet: it reads the row's `control_image` (or one made by `control`); `controlnet_scale` is its "
        "adapter_conditioning_scale")
    ip_adapter: str | None = Field(
        default=None, description="an IP-Adapter: a folder (a source as for `model`) holding its .safetensors "
        "weights and its image encoder in image_encoder/; the row's `reference_image` is the image it follows")
    ip_adapter_weight_name: str | None = Field(
        default=None, description="the IP-Adapter's .safetensors file in its folder, when it holds several; "
        "null: the only one there")
    ip_adapter_scale: Annotated[float, Field(ge=0, le=10)] = Field(
        default=1.0, description="how strongly the reference image steers; 0 gives the base model's images exactly")
    # The RECOMMENDED settings that filled fields this stage's spec left unset.
    _recommended: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _model_defaults(cls, data: Any, handler) -> "StageSpec":
        if not isinstance(data, dict):
            return handler(data)
        if data.get("cpus_per_actor", 0) is None:
            data = {k: v for k, v in data.items() if k != "cpus_per_actor"}
        if not data.get("model") and data.get("kind") in KINDS and data["kind"] not in DEFAULT_MODELS:
            # No trained built-in of this kind: a random-weight stand-in would draw noise.
            raise ValueError(f"model: a {data['kind']} stage needs a model (there is no trained built-in of "
                             "this kind)")
        if not data.get("model") and data.get("kind") in DEFAULT_MODELS:
            data = {**data, "model": DEFAULT_MODELS[data["kind"]]}
        applied = {k: v for k, v in RECOMMENDED.get(data.get("model"), {}).items() if data.get(k) is None}
        stage = handler({**data, **applied})
        stage._recommended = applied
        return stage

    @property
    def recommended(self) -> dict[str, Any]:
        """The built-in model's recommended settings applied to fields the spec left unset."""
        return dict(self._recommended)

    @property
    def fits_cpus(self) -> bool:
        """Whether cpus_per_actor was left for the plan to fit to the cluster."""
        return "cpus_per_actor" not in self.model_fields_set

    @property
    def conditioned(self) -> bool:
        """Whether the stage loads conditioning models (pipeline/conditioning/)."""
        return bool(self.loras or self.controlnet or self.t2i_adapter or self.ip_adapter)

    @property
    def control_models(self) -> int:
        """How many control images a row needs: one per ControlNet (a Union's: one per control_mode),
        one for a T2I-Adapter."""
        return max(len(self.controlnet), len(self.control_mode)) + (1 if self.t2i_adapter else 0)

    @property
    def draws_noise(self) -> bool:
        return self.model.startswith(NOISE_MODEL_PREFIX)

    @model_validator(mode="after")
    def _one_pipeline_over_gpus(self) -> "StageSpec":
        gpus = self.gpus_per_actor
        if gpus is not None and gpus > 1:
            if gpus != int(gpus):
                raise ValueError(f"gpus_per_actor: {gpus:g} is over 1 and not a whole number (a pipeline spread "
                                 "over GPUs takes whole ones: 2 to 8)")
            if self.offload != "none":
                raise ValueError(f"offload: {self.offload} and gpus_per_actor {gpus:g} both place the weights; "
                                 "spread the pipeline over GPUs or offload it, not both")
        return self

    @field_validator("controlnet", "control_mode", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, int)) else value

    @model_validator(mode="after")
    def _conditioning(self) -> "StageSpec":
        if self.controlnet and self.kind not in CONTROLNET_KINDS:
            raise ValueError(f"controlnet: {self.kind} stages take no ControlNet (only {', '.join(CONTROLNET_KINDS)})")
        if self.t2i_adapter and self.kind not in T2I_ADAPTER_KINDS:
            raise ValueError(f"t2i_adapter: {self.kind} stages take no T2I-Adapter (only "
                             f"{', '.join(T2I_ADAPTER_KINDS)})")
        if self.t2i_adapter and self.controlnet:
            raise ValueError("t2i_adapter: a stage takes a ControlNet or a T2I-Adapter, not both")
        if self.control_mode and (len(self.controlnet) > 1 or self.t2i_adapter):
            raise ValueError("control_mode: applies to one ControlNet Union, alone in its stage")
        twice = sorted({m for m in self.control_mode if self.control_mode.count(m) > 1})
        if twice:
            raise ValueError(f"control_mode: {twice} given more than once (one control image per type)")
        if self.t2i_adapter and {"control_start", "control_end"} & self.model_fields_set:
            raise ValueError("control_start, control_end: apply to ControlNets; a T2I-Adapter applies at every step")
        if self.ip_adapter and self.kind not in IP_ADAPTER_KINDS:
            raise ValueError(f"ip_adapter: {self.kind} stages take no IP-Adapter (only {', '.join(IP_ADAPTER_KINDS)})")
        if self.control_start >= self.control_end:
            raise ValueError(f"control_start {self.control_start} must be below control_end {self.control_end}")
        names = [lora.name for lora in self.loras if lora.name]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"loras: the name(s) {twice} are given to more than one adapter")
        return self

    @field_validator("actors", mode="before")
    @classmethod
    def _actors(cls, value: Any) -> Any:
        if isinstance(value, int):
            return (value, value)
        return value

    @field_validator("actors")
    @classmethod
    def _actors_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if low < 1 or high < low:
            raise ValueError(f"needs 1 <= min <= max, got [{low}, {high}]")
        return value


class FormatSpec(_Strict):
    """How the images and shards are written."""

    image: Literal["png", "webp", "jpeg"] = Field(default="png", description="image encoding: png | webp | jpeg")
    quality: Annotated[int, Field(ge=1, le=100)] = Field(default=95, description="webp / jpeg quality")
    rows_per_shard: Annotated[int, Field(ge=1)] = Field(default=1000, description="rows per Parquet shard: every "
                                                        "shard holds this many but the last of a run (per split) "
                                                        "and those published by time (publish_every_minutes)")
    publish_every_minutes: Annotated[float, Field(gt=0)] = Field(
        default=4.0, description="a row waits at most this long for its shard to fill: then the rows waiting are "
        "published as a partial shard, so an interrupt or a lost node costs minutes of work, not a shard")
    png_compress_level: Annotated[int, Field(ge=0, le=9)] = Field(
        default=1, description="zlib level of png images, 0 (none) to 9 (smallest, slowest); 1 encodes about 2.5x "
        "faster than PIL's default 6 for a slightly larger file")


class LimitsSpec(_Strict):
    """Bounds on what one row may ask for, so that an out-of-range row becomes an error row
    instead of an out-of-memory crash of its actor. They apply to the stages' own values, each
    row's overrides, the size a row reaches through the flow, and input images before decoding."""

    max_width: Annotated[int, Field(ge=8)] = Field(default=2048, description="pixels, each generated or input "
                                                   "image (and mask)")
    max_height: Annotated[int, Field(ge=8)] = Field(default=2048, description="pixels, each generated or input "
                                                    "image (and mask)")
    max_pixels: Annotated[int, Field(ge=64)] = Field(default=2048 * 2048, description="width x height")
    max_steps: Annotated[int, Field(ge=1)] = Field(default=200, description="denoising steps, per stage and per row")
    max_prompt_chars: Annotated[int, Field(ge=1)] = Field(default=2000, description="characters of prompt and of "
                                                          "negative_prompt")

    def size_problem(self, width: int, height: int) -> str | None:
        """What is wrong with a ``width`` x ``height`` image under these limits, or None."""
        if width > self.max_width:
            return f"width {width} is over limits.max_width {self.max_width}"
        if height > self.max_height:
            return f"height {height} is over limits.max_height {self.max_height}"
        if width * height > self.max_pixels:
            return f"{width}x{height} is {width * height} pixels, over limits.max_pixels {self.max_pixels}"
        return None

    def flow_problem(self, flow: list["StageSpec"], width: int, height: int) -> str | None:
        """What is wrong with the images a row that starts at ``width`` x ``height`` reaches
        along ``flow`` (a super-resolution stage makes them larger), or None."""
        for stage in flow:
            width, height = width * KINDS[stage.kind].scale, height * KINDS[stage.kind].scale
            problem = self.size_problem(width, height)
            if problem:
                return f"{stage.kind} makes {width}x{height}: {problem}"
        return None


class ConfidenceFilterSpec(_Strict):
    """Keep a row only if a classifier gives its class a probability above ``threshold``."""

    model: str = Field(
        default="builtin:shape-classifier",
        description="the classifier: builtin:shape-classifier (the shapes set) or a folder in its format",
    )
    threshold: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="None: 1/C, C the number of classes among the job's rows (He et al., ICLR 2023)")
    label_column: str = Field(default="label_name",
                              description="the manifest column that names each row's class as the classifier does")


class FiltersSpec(_Strict):
    """Filters mark rows `status: filtered` with the reason in `filter_reason`; no row is dropped.
    They run over the whole output once every shard is written (pipeline/synth/filters.py). Only
    the filters the spec names run: each is off by default."""

    exact_duplicates: bool = Field(default=False, description="filter rows whose image_sha256 an earlier id has")
    near_duplicate_distance: Annotated[int, Field(ge=0, le=64)] | None = Field(
        default=None, description="filter rows whose 64-bit perceptual hash (imagehash.phash) is at most this many "
        "bits from a kept earlier id's (2 is a usual choice); None: off")
    confidence: ConfidenceFilterSpec | None = Field(default=None, description="the classifier-confidence filter")


class JobSpec(_Strict):
    """A job: the manifest to read, the stages to run, the output to write."""

    manifest: str = Field(description="a Parquet file, or a folder / prefix of them: local path or s3://")
    output: str = Field(description="the dataset folder: shards go under OUTPUT/data/")
    columns: dict[ManifestColumn, str] = Field(
        default={},
        description="the manifest's own name for a column shardgen reads, e.g. {id: image_name, "
        "guidance_scale: cfg}; the output names it as shardgen does. An entry for a generation parameter "
        "(steps, guidance_scale, strength, width, height) makes that column a per-row override",
    )
    overrides: list[OverrideColumn] = Field(
        default=[],
        description="manifest columns, under their own names, that set a generation parameter per row of the "
        "first stage; every other manifest column passes through to the output, under `source_NAME` where the "
        "output has a column NAME of its own (docs/contract.md)",
    )
    storage: StorageSpec = Field(default=StorageSpec(), description="object storage options")
    stages: Annotated[list[StageSpec], Field(min_length=1)] = Field(
        default=[StageSpec(kind="text_to_image")],
        description="the chain of stages every row goes through (a cascade when several)",
    )
    flows: dict[str, Annotated[list[StageSpec], Field(min_length=1)]] | None = Field(
        default=None,
        description="named chains of stages; the manifest's `task` column routes each row to one",
    )
    format: FormatSpec = Field(default=FormatSpec(), description="how images and shards are written")
    limits: LimitsSpec = Field(default=LimitsSpec(), description="bounds on what one row may ask for")
    filters: FiltersSpec | None = Field(default=None, description="duplicate and confidence filters; null: off")
    max_error_fraction: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.0,
        description="the share of error rows a finished job tolerates and still exits 0; above it, exit 3",
    )

    @field_validator("columns")
    @classmethod
    def _one_name_each(cls, value: dict[str, str]) -> dict[str, str]:
        names = list(value.values())
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"manifest column(s) {twice} are mapped to more than one name")
        return value

    @model_validator(mode="after")
    def _stages_or_flows(self) -> "JobSpec":
        if self.flows is not None:
            if "stages" in self.model_fields_set:
                raise ValueError("give either `stages` (one flow for every row) or `flows` (routed by `task`), "
                                 "not both")
            if not self.flows:
                raise ValueError("flows: needs at least one flow")
        for name, flow in self.flow_map().items():
            # Later stages take the previous stage's image; only the first may make one from nothing.
            for stage in flow[1:]:
                if not KINDS[stage.kind].takes_image:
                    raise ValueError(f"flow {name!r}: {stage.kind} can only be the first stage")
        return self

    @model_validator(mode="after")
    def _stages_within_limits(self) -> "JobSpec":
        limits = self.limits
        for name, flow in self.flow_map().items():
            prefix = "stages" if self.flows is None else f"flows.{name}"
            for i, stage in enumerate(flow):
                if stage.steps > limits.max_steps:
                    raise ValueError(f"{prefix}.{i}.steps: {stage.steps} is over limits.max_steps {limits.max_steps}")
                problem = limits.size_problem(stage.width, stage.height)
                if problem:
                    raise ValueError(f"{prefix}.{i}: {problem}")
            if flow[0].kind == "text_to_image":
                problem = limits.flow_problem(flow, flow[0].width, flow[0].height)
                if problem:
                    raise ValueError(f"{prefix}: {problem}")
        return self

    def flow_map(self) -> dict[str, list[StageSpec]]:
        """Every flow by name; a spec with plain `stages` has the one flow "default"."""
        return self.flows if self.flows is not None else {"default": self.stages}

    def all_stages(self) -> list[StageSpec]:
        return [stage for flow in self.flow_map().values() for stage in flow]

    def public_dict(self) -> dict[str, Any]:
        """The spec as run, with secrets left out (for _job.json and logs)."""
        data = self.model_dump(mode="json")
        for name in ("key", "secret", "token"):
            data["storage"].pop(name, None)
        return data


def _error_text(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(spec)"
        lines.append(f"  {where}: {item['msg']}")
    return "invalid job spec:\n" + "\n".join(lines)


def parse_spec(data: Any, night: date | str | None = None, **overrides: Any) -> JobSpec:
    """Validate a spec from a mapping; ``overrides`` (command-line flags) win when not None.
    ``{date}`` and ``{yesterday}`` are filled in for ``night`` (pipeline/dates.py)."""
    if not isinstance(data, dict):
        raise SpecError("invalid job spec: expected a mapping of fields at the top level")
    data = dates.resolve({**data, **{k: v for k, v in overrides.items() if v is not None}}, night)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_error_text(err)) from None


def parse_spec_text(text: str, source: str, night: date | str | None = None, **overrides: Any) -> JobSpec:
    try:
        data = json.loads(text) if source.endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise SpecError(f"cannot parse job spec {source}: {err}") from None
    return parse_spec(data or {}, night, **overrides)


def load_spec_file(path: str | Path, night: date | str | None = None, **overrides: Any) -> JobSpec:
    path = Path(path)
    return parse_spec_text(path.read_text(), str(path), night, **overrides)


def json_schema() -> dict[str, Any]:
    """The job spec as a JSON Schema, for editors (the YAML language server reads it)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            **JobSpec.model_json_schema(mode="validation"), "title": "shardgen job spec"}
