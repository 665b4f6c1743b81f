"""Conditioning in process, as a Ray actor runs a stage (tiny random-weight models built offline in
tests/tiny_conditioning.py): LoRA adapters (scale 0 is the base model byte for byte, fused equals
switched, the `lora` column picks per row, a misfit is refused on the driver, sources from s3://
and a stand-in Hub), ControlNets on SD 1.x, SDXL, SD3 and FLUX.1 for each kind diffusers has a
pipeline of (the control image steers: two control images, two images; the same one, the same
image; scale 0 hides it; a missing or wrong-sized one is an error row naming the column; a saved
ControlNet pipeline as the model), an SDXL ControlNet Union (a control image per `control_mode`),
a FLUX.1 Control model (its transformer reads the control image), IP-Adapters on SD 1.x, SDXL,
FLUX.1 and SD3 (the reference image steers; scale 0 is the base model byte for byte),
T2I-Adapters on SD 1.x (the shapes model), and Canny control images made on CPU."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pyarrow as pa
import pytest
from diffusers import (
    DiffusionPipeline,
    FluxControlNetModel,
    FluxControlNetPipeline,
    HunyuanDiT2DControlNetModel,
    QwenImageControlNetModel,
    SD3ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetUnionPipeline,
    ZImageControlNetModel,
)
from PIL import Image

from pipeline import columns, storage
from pipeline.access import policy
from pipeline.conditioning import controlnet
from pipeline.conditioning.control_images import canny
from pipeline.errors import ManifestError, ModelError
from pipeline.manifest import check as manifest_check
from pipeline.models.resolve import build_builtin, check_sources
from pipeline.prepare import prepare_batch
from pipeline.spec import ControlSpec, LimitsSpec, StageSpec, StorageSpec, parse_spec
from pipeline.stages import stage_class
from pipeline.tables import values
from tests.helpers import write_manifest
from tests.hub_server import HubServer, Repo
from tests.tiny_conditioning import (
    controlnet_for,
    flux_control,
    flux_ip_adapter_for,
    hunyuan_dit_for_controlnets,
    ip_adapter_for,
    lora_for,
    misfit_lora,
    sd3_for_controlnets,
    sd3_ip_adapter_for,
    t2i_adapter_for,
    transformer_controlnet_for,
)
from tests.tiny_families import FAMILY_BUILDERS
from tests.tiny_pipelines import BUILDERS, saved, sdxl

FAST = {"steps": 2, "cpus_per_actor": 0.5, "width": 32, "height": 32}
PROMPTS = ["a red circle on a blue background", "a green square", "a yellow star"]
TINY = "builtin:tiny-sd"


def square(side: int, lo: int, hi: int) -> bytes:
    """A white square on black, as PNG bytes: a control image (edges, a mask) of a shape."""
    image = np.zeros((side, side, 3), dtype=np.uint8)
    image[lo:hi, lo:hi] = 255
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def models(tmp_path_factory, environment):
    """Folders of the tiny conditioning models: LoRAs that fit tiny-sd (two) and one that does not,
    a ControlNet and an IP-Adapter for tiny-sd, the tiny SDXL pipeline, a ControlNet and a
    ControlNet Union for it, and
    a T2I-Adapter for the shapes model (tiny-sd's first down block has no attention, after which
    diffusers adds an adapter's first feature at the next size)."""
    root = tmp_path_factory.mktemp("conditioning")
    sd = build_builtin("tiny-sd")
    # Seeded (saved): unseeded weights would follow whatever ran before in the worker, and a rare draw
    # makes a ControlNet's effect round away.
    xl = saved(sdxl)(root / "sdxl")
    return {"sd": sd, "lora": lora_for(sd, root / "lora-a"), "lora_b": lora_for(sd, root / "lora-b", seed=1),
            "misfit": misfit_lora(root / "misfit"), "controlnet": controlnet_for(sd, root / "controlnet"),
            "sdxl": xl, "sdxl_controlnet": controlnet_for(xl, root / "sdxl-controlnet"),
            "sdxl_union": controlnet_for(xl, root / "sdxl-union", union=True),
            "ip_adapter": ip_adapter_for(sd, root / "ip-adapter"),
            "t2i_adapter": t2i_adapter_for(build_builtin("shapes-t2i"), root / "t2i-adapter")}


def run(spec: StageSpec, rows: list[dict], tmp_path, stage=None) -> pa.Table:
    """Prepare ``rows`` for a one-stage flow and run the stage on them (a new stage unless given)."""
    access = policy(str(tmp_path / "manifest.parquet"), False, [])
    table = prepare_batch(pa.Table.from_pylist(rows), [spec], StorageSpec(), access, LimitsSpec())
    return (stage or stage_class(spec.kind)(spec, StorageSpec()))(table)


def prompt_rows(**extra) -> list[dict]:
    return [{"id": f"r{i}", "prompt": p, "seed": 7, **{k: v[i] for k, v in extra.items()}}
            for i, p in enumerate(PROMPTS)]


def images(table: pa.Table) -> list[bytes]:
    assert values(table, "status") == ["ok"] * table.num_rows, values(table, "error")
    return values(table, columns.PIXELS)


def gap(a: bytes, b: bytes) -> int:
    """The largest difference of two images' pixels, in levels of 255."""
    return int(np.abs(np.frombuffer(a, np.uint8).astype(int) - np.frombuffer(b, np.uint8).astype(int)).max())


def t2i(model, **extra) -> StageSpec:
    return StageSpec(kind="text_to_image", model=str(model), **FAST, **extra)


# -- LoRA -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_images(models, tmp_path_factory):
    return images(run(t2i(TINY), prompt_rows(), tmp_path_factory.mktemp("base")))


def test_lora_scale_zero_is_the_base_model_byte_for_byte(models, base_images, tmp_path):
    spec = t2i(TINY, loras=[{"source": str(models["lora"]), "scale": 0.0}])
    assert images(run(spec, prompt_rows(), tmp_path)) == base_images


def test_lora_changes_the_images_and_the_record_names_it(models, base_images, tmp_path):
    spec = t2i(TINY, loras=[{"source": str(models["lora"].parent), "scale": 0.8}])
    out = run(spec, prompt_rows(), tmp_path)
    assert all(gap(a, b) > 2 for a, b in zip(images(out), base_images))
    (record,) = json.loads(values(out, columns.STAGE_PARAMS)[0])
    assert record["loras"] == [{"source": str(models["lora"].parent), "name": "lora0", "weight_name": None,
                                "revision": None, "scale": 0.8}]


def test_fused_adapters_equal_switched_ones_and_the_lora_column_picks_per_row(models, base_images, tmp_path):
    """Two unnamed adapters are fused; the same two, named, are applied unfused to the rows whose
    `lora` column names them both, and none to the row whose `lora` is null."""
    both = [{"source": str(models["lora"]), "scale": 0.7}, {"source": str(models["lora_b"]), "scale": 0.4}]
    fused_stage = stage_class("text_to_image")(t2i(TINY, loras=both), StorageSpec())
    assert fused_stage.conditioning.adapters.fused
    fused = images(run(fused_stage.spec, prompt_rows(), tmp_path, fused_stage))
    named = t2i(TINY, loras=[{**both[0], "name": "a"}, {**both[1], "name": "b"}], batch_size=3)
    out = run(named, prompt_rows(lora=["a,b", None, "b, a"]), tmp_path)
    got = images(out)
    # Fusing adds the adapters into the weights: the same sums in another order, so a pixel may
    # round one step apart.
    assert gap(got[0], fused[0]) <= 1 and gap(got[2], fused[2]) <= 1
    assert images(out)[1] == base_images[1]
    records = [json.loads(p)[0]["loras"] for p in values(out, columns.STAGE_PARAMS)]
    assert [[a["name"] for a in r] for r in records] == [["a", "b"], [], ["a", "b"]]


def test_an_unknown_lora_name_is_an_error_row_naming_the_column(models, tmp_path):
    spec = t2i(TINY, loras=[{"source": str(models["lora"]), "name": "style"}])
    out = run(spec, prompt_rows(lora=["style", "nope", None]), tmp_path)
    assert values(out, "status") == ["ok", "error", "ok"]
    assert values(out, "error")[1] == "lora: ['nope'] are not named adapters of the stage (its names: ['style'])"


def test_a_lora_that_does_not_fit_the_model_is_refused_on_the_driver(models, tmp_path):
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompt_rows())
    stage = {"kind": "text_to_image", "model": TINY, "loras": [{"source": str(models["misfit"])}]}
    spec = parse_spec({"manifest": manifest, "output": str(tmp_path / "out"), "stages": [stage]})
    with pytest.raises(ModelError, match=r"loras\.0: .* does not fit the model builtin:tiny-sd: unet\..*attn2\.to_k"):
        check_sources(spec)
    assert ModelError.exit_code == 2


def test_pickled_or_ambiguous_lora_folders_are_refused(models, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "lora.bin").write_bytes(b"pickle")
    two = tmp_path / "two"
    shutil.copytree(models["lora"].parent, two)
    shutil.copy(models["lora_b"], two / "other.safetensors")
    for source, message in ((pickled, "only pickled weights"), (two, "name one with weight_name")):
        spec = parse_spec({"manifest": str(tmp_path / "m.parquet"), "output": str(tmp_path / "out"),
                           "stages": [{"kind": "text_to_image", "model": TINY, "loras": [{"source": str(source)}]}]})
        with pytest.raises(ModelError, match=message):
            check_sources(spec)


def test_loras_from_s3_and_a_hub_id_give_the_local_adapters_images(models, tmp_path, bucket, monkeypatch):
    storage.write_bytes(f"{bucket}/loras/style.safetensors", models["lora"].read_bytes())
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(models["lora"], repo / "style.safetensors")
    (repo / "README.md").write_text("# a LoRA\n")
    commit = "c" * 40
    local = images(run(t2i(TINY, loras=[{"source": str(models["lora"])}]), prompt_rows(), tmp_path))
    with HubServer({"shardgen-test/style-lora": Repo(repo, commit)}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("SHARDGEN_CACHE", str(tmp_path / "cache"))
        for source in (f"{bucket}/loras", "shardgen-test/style-lora"):
            spec = t2i(TINY, loras=[{"source": source}])
            out = run(spec, prompt_rows(), tmp_path)
            assert images(out) == local, source
        assert json.loads(values(out, columns.STAGE_PARAMS)[0])[0]["loras"][0]["revision"] == commit
        hub.requests.clear()
        run(spec, prompt_rows(), tmp_path)  # a second actor on this node: from the cache
        assert not [r for r in hub.requests if r[0] == "GET" and "resolve" in str(r)]


# -- ControlNet -------------------------------------------------------------------------------------


def test_the_control_image_steers_the_image(models, tmp_path):
    """Same prompt and seed: two control images give two images, the same one the same image."""
    spec = t2i(TINY, controlnet=str(models["controlnet"]), controlnet_scale=1.0)
    a, b = square(32, 4, 12), square(32, 16, 30)
    out = run(spec, [{"id": f"r{i}", "prompt": PROMPTS[0], "seed": 3, "control_image": c}
                     for i, c in enumerate((a, b, a))], tmp_path)
    got = images(out)
    assert gap(got[0], got[1]) > 2 and got[0] == got[2]
    (record,) = json.loads(values(out, columns.STAGE_PARAMS)[0])
    assert record["pipeline"] == "StableDiffusionControlNetPipeline"
    assert record["controlnet"] == {"models": [str(models["controlnet"])], "scale": 1.0, "start": 0.0, "end": 1.0,
                                    "control_image": "manifest"}


def test_two_controlnets_read_control_image_and_control_image_2(models, tmp_path):
    spec = t2i(TINY, controlnet=[str(models["controlnet"])] * 2)
    a, b = square(32, 4, 12), square(32, 16, 30)
    rows = [{"id": f"r{i}", "prompt": PROMPTS[0], "seed": 3, "control_image": a, "control_image_2": c}
            for i, c in enumerate((a, b, a))]
    out = run(spec, rows, tmp_path)
    got = images(out)
    assert got[0] == got[2] and gap(got[0], got[1]) > 2
    assert json.loads(values(out, columns.STAGE_PARAMS)[0])[0]["controlnet"]["models"] == spec.controlnet
    missing = run(spec, [{k: v for k, v in rows[0].items() if k != "control_image_2"}], tmp_path)
    assert values(missing, "error") == ["control_image_2: missing"]


@pytest.mark.parametrize("family", ["sd", "sdxl-image_to_image", "flux"])
def test_two_controlnets_in_calls_of_several_rows(family, request, tmp_path):
    """Three rows with two ControlNets, in calls of several rows: each row gets its own pair of
    control images. SD 1.x's text-to-image pipeline reads them per row and FLUX.1's per ControlNet,
    in one call; SDXL's take one image per ControlNet, so rows are grouped by their control images."""
    if family == "flux":
        built = request.getfixturevalue("dit_models")
        model, controlnet, kind, inputs = built["flux"], built["flux_controlnet"], "text_to_image", {}
    else:
        built = request.getfixturevalue("models")
        model, controlnet = (TINY, built["controlnet"]) if family == "sd" else (built["sdxl"], built["sdxl_controlnet"])
        kind, inputs = ("text_to_image", {}) if family == "sd" else ("image_to_image", {"image": picture()})
    spec = StageSpec(kind=kind, model=str(model), controlnet=[str(controlnet)] * 2, batch_invariant=False,
                     batch_size=3, **FAST)
    a, b = square(32, 4, 12), square(32, 16, 30)
    rows = [{"id": f"r{i}", "prompt": PROMPTS[0], "seed": 3, "control_image": a, "control_image_2": c, **inputs}
            for i, c in enumerate((a, b, a))]
    stage = stage_class(kind)(spec, StorageSpec())
    calls, generate = [], stage.generate
    stage.generate = lambda batch, rows: calls.append(len(rows)) or generate(batch, rows)
    got = images(run(spec, rows, tmp_path, stage))
    assert calls == ([2, 1] if family.startswith("sdxl") else [3])
    # Rows 0 and 2 are one row twice: in one call on a CPU they agree up to rounding (a batch's
    # rows may take different kernel paths); row 1's other control image makes another picture.
    assert gap(got[0], got[2]) <= 2 < gap(got[0], got[1])


def test_a_per_row_controlnet_scale_of_zero_ignores_the_control_image(models, tmp_path):
    spec = t2i(TINY, controlnet=str(models["controlnet"]))
    rows = [{"id": f"r{i}", "prompt": PROMPTS[0], "seed": 3, "control_image": c, "controlnet_scale": s}
            for i, (c, s) in enumerate(((square(32, 4, 12), 0.0), (square(32, 16, 30), 0.0), (square(32, 4, 12), 1.0)))]
    got = images(run(spec, rows, tmp_path))
    assert got[0] == got[1] and gap(got[0], got[2]) > 2


def test_missing_or_wrong_sized_control_images_are_error_rows_naming_the_column(models, tmp_path):
    spec = t2i(TINY, controlnet=str(models["controlnet"]))
    rows = [{"id": "ok", "prompt": PROMPTS[0], "control_image": square(32, 4, 12)},
            {"id": "none", "prompt": PROMPTS[0], "control_image": None},
            {"id": "small", "prompt": PROMPTS[0], "control_image": square(16, 4, 12)},
            {"id": "broken", "prompt": PROMPTS[0], "control_image": b"not a png"}]
    out = run(spec, rows, tmp_path)
    assert values(out, "status") == ["ok", "error", "error", "error"]
    assert values(out, "error")[1:] == [
        "control_image: missing", "control_image: size 16x16 differs from the 32x32 image the stage makes",
        "control_image: not a readable image (UnidentifiedImageError: no known image format)"]


@pytest.mark.parametrize("family", ["sd", "sdxl-union", "flux"])
def test_a_saved_controlnet_pipeline_named_as_the_model_runs_with_its_controlnet(family, request, tmp_path):
    """The saved pipeline gives the images its ControlNet gives named by the stage's `controlnet`
    (a Union's with its control_mode)."""
    built = request.getfixturevalue("dit_models" if family == "flux" else "models")
    if family == "sd":
        base, net, pipeline_class, extra = built["sd"], built["controlnet"], StableDiffusionControlNetPipeline, {}
    elif family == "flux":
        base, net, pipeline_class, extra = built["flux"], built["flux_controlnet"], FluxControlNetPipeline, {}
    else:
        base, net, pipeline_class = built["sdxl"], built["sdxl_union"], StableDiffusionXLControlNetUnionPipeline
        extra = {"control_mode": [1, 3]}
    folder = tmp_path / "saved"
    net_model = getattr(diffusers, controlnet.model_class(Path(net))).from_pretrained(net)
    pipeline_class(**DiffusionPipeline.from_pretrained(base).components, controlnet=net_model).save_pretrained(
        folder, safe_serialization=True)
    rows = [{"id": f"r{i}", "prompt": PROMPTS[0], "seed": 3, "control_image": square(32, 4, 12 + 8 * i),
             "control_image_2": square(32, 16, 30)} for i in range(2)]
    by_model = images(run(t2i(folder, **extra), rows, tmp_path))
    by_field = images(run(t2i(base, controlnet=str(net), **extra), rows, tmp_path))
    assert by_model == by_field and gap(by_model[0], by_model[1]) > 2


def test_sdxl_controlnet_lora_and_ip_adapter(models, tmp_path):
    """One SDXL stage with all three: the control image steers, and so does the reference image."""
    spec = t2i(models["sdxl"], controlnet=str(models["sdxl_controlnet"]),
               loras=[{"source": str(lora_for(models["sdxl"], tmp_path / "xl-lora"))}],
               ip_adapter=str(ip_adapter_for(models["sdxl"], tmp_path / "xl-ip-adapter")))
    a, b = square(32, 4, 12), square(32, 4, 24)
    rows = [{"id": f"r{i}", "prompt": PROMPTS[0], "seed": 3, "control_image": c, "reference_image": r}
            for i, (c, r) in enumerate(((a, noise_png(0)), (b, noise_png(0)), (a, noise_png(1))))]
    out = run(spec, rows, tmp_path)
    got = images(out)
    assert gap(got[0], got[1]) > 2 and gap(got[0], got[2]) > 2
    (record,) = json.loads(values(out, columns.STAGE_PARAMS)[0])
    assert record["pipeline"] == "StableDiffusionXLControlNetPipeline" and record["ip_adapter"]["scale"] == 1.0


# The ControlNet pipelines run beyond SD 1.x text_to_image: (family, kind) -> the pipeline, and
# whether a controlnet_scale of 0 gives the plain pipeline's image byte for byte. FLUX.1's do not:
# they draw the control image's VAE latents from the row's generator before its noise, so the noise
# differs from the plain pipeline's (the control image still does not show at 0).
FAMILY_CASES = {
    ("sd", "inpainting"): ("StableDiffusionControlNetInpaintPipeline", True),
    ("sdxl", "image_to_image"): ("StableDiffusionXLControlNetImg2ImgPipeline", True),
    ("sdxl", "inpainting"): ("StableDiffusionXLControlNetInpaintPipeline", True),
    ("sd3", "text_to_image"): ("StableDiffusion3ControlNetPipeline", True),
    ("sd3", "inpainting"): ("StableDiffusion3ControlNetInpaintingPipeline", False),
    ("flux", "text_to_image"): ("FluxControlNetPipeline", False),
    ("flux", "image_to_image"): ("FluxControlNetImg2ImgPipeline", False),
    ("flux", "inpainting"): ("FluxControlNetInpaintPipeline", False),
    ("qwen-image", "text_to_image"): ("QwenImageControlNetPipeline", False),
    ("qwen-image", "inpainting"): ("QwenImageControlNetInpaintPipeline", False),
    ("hunyuan-dit", "text_to_image"): ("HunyuanDiTControlNetPipeline", True),
    ("z-image", "text_to_image"): ("ZImageControlNetPipeline", True),
    ("z-image", "inpainting"): ("ZImageControlNetInpaintPipeline", False),
}


@pytest.fixture(scope="module")
def dit_models(tmp_path_factory):
    """The tiny SD3 (two blocks: see sd3_for_controlnets) and FLUX.1 pipelines and ControlNets for
    them: SD3's for text, SD3's for inpainting (the masked image's latents and the mask: one extra
    channel, as Alimama's), FLUX.1's, and a FLUX.1 Union ControlNet of four control types."""
    root = tmp_path_factory.mktemp("dit-controlnets")
    sd3, flux = saved(sd3_for_controlnets)(root / "sd3"), saved(BUILDERS["flux"])(root / "flux")
    return {"sd3": sd3, "flux": flux,
            "sd3_text_to_image": transformer_controlnet_for(sd3, root / "sd3-cn", SD3ControlNetModel, num_layers=1),
            "sd3_inpainting": transformer_controlnet_for(sd3, root / "sd3-inpaint-cn", SD3ControlNetModel,
                                                         num_layers=1, extra_conditioning_channels=1),
            "flux_controlnet": transformer_controlnet_for(flux, root / "flux-cn", FluxControlNetModel, num_layers=1,
                                                          num_single_layers=1),
            "flux_union": transformer_controlnet_for(flux, root / "flux-union", FluxControlNetModel, num_layers=1,
                                                     num_single_layers=1, num_mode=4)}


@pytest.fixture(scope="module")
def more_dit_models(tmp_path_factory):
    """The tiny Qwen-Image, HunyuanDiT (four blocks: see hunyuan_dit_for_controlnets) and Z-Image
    pipelines and ControlNets for them: Qwen-Image's for text and for inpainting (the masked
    image's latents and the mask, packed 2x2: four extra channels), HunyuanDiT's, Z-Image's for
    text (the control latents' 16 channels) and for inpainting (the control's, the mask's and the
    masked image's: 33, as Z-Image-Turbo-Fun-Controlnet-Union-2.0's)."""
    root = tmp_path_factory.mktemp("more-dit-controlnets")
    qwen = FAMILY_BUILDERS["qwen-image"](root / "qwen-image")
    hunyuan = saved(hunyuan_dit_for_controlnets)(root / "hunyuan-dit")
    z_image = FAMILY_BUILDERS["z-image"](root / "z-image")
    z_control = {"control_layers_places": [0], "control_refiner_layers_places": [0], "n_refiner_layers": 1}
    return {"qwen-image": qwen, "hunyuan-dit": hunyuan, "z-image": z_image,
            "z-image_text_to_image": transformer_controlnet_for(z_image, root / "z-cn", ZImageControlNetModel,
                                                                control_in_dim=16, **z_control),
            "z-image_inpainting": transformer_controlnet_for(z_image, root / "z-inpaint-cn", ZImageControlNetModel,
                                                             control_in_dim=33, **z_control),
            "qwen-image_text_to_image": transformer_controlnet_for(qwen, root / "qwen-cn", QwenImageControlNetModel,
                                                                   num_layers=1),
            "qwen-image_inpainting": transformer_controlnet_for(qwen, root / "qwen-inpaint-cn",
                                                                QwenImageControlNetModel, num_layers=1,
                                                                extra_condition_channels=4),
            "hunyuan-dit_text_to_image": transformer_controlnet_for(hunyuan, root / "hunyuan-cn",
                                                                    HunyuanDiT2DControlNetModel,
                                                                    transformer_num_layers=4)}


def picture(seed: int = 0) -> bytes:
    """A 32x32 RGB picture (smooth noise) to change or repaint."""
    buf = io.BytesIO()
    small = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize((32, 32), Image.BILINEAR).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("family,kind", sorted(FAMILY_CASES))
def test_controlnets_of_each_family_and_kind(family, kind, request, tmp_path):
    """Same prompt and seed: two control images give two images, the same one the same image; at a
    controlnet_scale of 0 the control image does not show, and the image is the plain pipeline's
    where diffusers makes that exact."""
    pipeline, zero_is_base = FAMILY_CASES[(family, kind)]
    if family in ("sd", "sdxl"):
        built = request.getfixturevalue("models")
        model, controlnet = (TINY, built["controlnet"]) if family == "sd" else (built["sdxl"], built["sdxl_controlnet"])
    else:  # only the family's fixture is built
        built = request.getfixturevalue("dit_models" if family in ("sd3", "flux") else "more_dit_models")
        model, controlnet = built[family], built.get(f"{family}_{kind}") or built[f"{family}_controlnet"]
    inputs = {"image_to_image": {"image": picture()}, "inpainting": {"image": picture(), "mask": square(32, 8, 24)},
              "text_to_image": {}}[kind]
    a, b = square(32, 4, 12), square(32, 16, 30)
    rows = [{"id": f"r{i}", "prompt": PROMPTS[0], "seed": 3, "control_image": c, "controlnet_scale": s, **inputs}
            for i, (c, s) in enumerate(((a, 1.0), (b, 1.0), (a, 1.0), (a, 0.0), (b, 0.0)))]
    out = run(StageSpec(kind=kind, model=str(model), controlnet=str(controlnet), **FAST), rows, tmp_path)
    got = images(out)
    assert gap(got[0], got[1]) > 2 and got[0] == got[2]
    assert got[3] == got[4]
    assert json.loads(values(out, columns.STAGE_PARAMS)[0])[0]["pipeline"] == pipeline
    base = images(run(StageSpec(kind=kind, model=str(model), **FAST), rows[3:4], tmp_path))
    assert (got[3] == base[0]) is zero_is_base


def test_what_a_controlnet_pipeline_lacks_is_refused_on_the_driver(more_dit_models, tmp_path):
    """HunyuanDiT's ControlNet pipeline applies at every step: control_end is refused, naming it;
    Qwen-Image's takes one ControlNet."""
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompt_rows())
    cases = (("hunyuan-dit", {"control_end": 0.5}, "control_end: HunyuanDiTControlNetPipeline takes no "
                                                   "control_guidance_end; leave it unset"),
             ("qwen-image", {"controlnet": [str(more_dit_models["qwen-image_text_to_image"])] * 2},
              "controlnet: QwenImageControlNetPipeline takes one ControlNet; this stage has 2"))
    for family, extra, message in cases:
        stage = {"kind": "text_to_image", "model": str(more_dit_models[family]),
                 "controlnet": str(more_dit_models[f"{family}_text_to_image"]), **extra}
        with pytest.raises(ModelError, match=message):
            check_sources(parse_spec({"manifest": manifest, "output": str(tmp_path / "out"), "stages": [stage]}))


@pytest.mark.parametrize("kind", ["text_to_image", "image_to_image", "inpainting"])
def test_an_sdxl_controlnet_union_reads_a_control_image_per_control_mode(kind, models, tmp_path):
    """A ControlNetUnionModel folder runs SDXL's Union pipelines: `control_mode` names the type of
    `control_image` and `control_image_2`; each image and each type steers, and the record says
    which types."""
    union = models["sdxl_union"]
    inputs = {"image_to_image": {"image": picture()}, "inpainting": {"image": picture(), "mask": square(32, 8, 24)},
              "text_to_image": {}}[kind]
    a, b = square(32, 4, 12), square(32, 16, 30)
    rows = [{"id": f"r{i}", "prompt": PROMPTS[0], "seed": 3, "control_image": c, "control_image_2": b, **inputs}
            for i, c in enumerate((a, b, a))]
    spec = StageSpec(kind=kind, model=str(models["sdxl"]), controlnet=str(union), control_mode=[1, 3], **FAST)
    out = run(spec, rows, tmp_path)
    got = images(out)
    assert gap(got[0], got[1]) > 2 and got[0] == got[2]
    (record,) = json.loads(values(out, columns.STAGE_PARAMS)[0])
    assert record["pipeline"] == {"text_to_image": "StableDiffusionXLControlNetUnionPipeline",
                                  "image_to_image": "StableDiffusionXLControlNetUnionImg2ImgPipeline",
                                  "inpainting": "StableDiffusionXLControlNetUnionInpaintPipeline"}[kind]
    assert record["controlnet"]["control_mode"] == [1, 3]
    other_types = run(spec.model_copy(update={"control_mode": [0, 5]}), rows[:1], tmp_path)
    assert gap(images(other_types)[0], got[0]) > 2


def test_a_flux_union_controlnet_reads_the_type_of_its_control_image(dit_models, tmp_path):
    """A FluxControlNetModel with num_mode (InstantX's FLUX.1 Union): `control_mode` gives the type
    of its one control image; the image and the type each steer."""
    flux, union = str(dit_models["flux"]), str(dit_models["flux_union"])
    a, b = square(32, 4, 12), square(32, 16, 30)
    rows = [{"id": f"r{i}", "prompt": PROMPTS[0], "seed": 3, "control_image": c} for i, c in enumerate((a, b, a))]
    spec = t2i(flux, controlnet=union, control_mode=2)
    out = run(spec, rows, tmp_path)
    got = images(out)
    assert gap(got[0], got[1]) > 2 and got[0] == got[2]
    (record,) = json.loads(values(out, columns.STAGE_PARAMS)[0])
    assert record["pipeline"] == "FluxControlNetPipeline" and record["controlnet"]["control_mode"] == [2]
    # The type is one token before the prompt's 512 in the ControlNet's attention: in random weights
    # it moves the picture by a level or so of 255 (seeded weights: the same every run), so this
    # says only that it moves it.
    other_type = images(run(spec.model_copy(update={"control_mode": [0]}), rows[:1], tmp_path))
    assert other_type[0] != got[0]
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompt_rows())
    for extra, message in (({}, "is a ControlNet Union: give the control type"),
                           ({"control_mode": 4}, r"control_mode: \[4\] are not control types of .* \(it has 4: "
                                                 r"0 to 3\)"),
                           ({"control_mode": [0, 1]}, "is a FLUX.1 Union ControlNet, which reads one control image")):
        stage = {"kind": "text_to_image", "model": flux, "controlnet": union, **extra}
        with pytest.raises(ModelError, match=message):
            check_sources(parse_spec({"manifest": manifest, "output": str(tmp_path / "out"), "stages": [stage]}))


def test_control_mode_rules(models, tmp_path):
    """Refused naming the field: a Union without control_mode, control_mode on another ControlNet,
    a type the Union lacks, a type twice, several ControlNets with a Union's types."""
    union, plain = str(models["sdxl_union"]), str(models["sdxl_controlnet"])
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompt_rows())
    cases = (({"controlnet": union}, "control_mode: .* is a ControlNet Union: give the control type"),
             ({"controlnet": plain, "control_mode": 1}, "control_mode: applies to a ControlNet Union "
                                                          r"\(ControlNetUnionModel, or a FluxControlNetModel with "
                                                          r"num_mode\); .* is a ControlNetModel"),
             ({"controlnet": union, "control_mode": [1, 6]}, r"control_mode: \[6\] are not control types of .* "
                                                               r"\(it has 6: 0 to 5\)"))
    for extra, message in cases:
        stage = {"kind": "text_to_image", "model": str(models["sdxl"]), **extra}
        spec = parse_spec({"manifest": manifest, "output": str(tmp_path / "out"), "stages": [stage]})
        with pytest.raises(ModelError, match=message):
            check_sources(spec)
    with pytest.raises(ValueError, match=r"control_mode: \[3\] given more than once"):
        StageSpec(kind="text_to_image", model=TINY, controlnet=union, control_mode=[3, 3])
    with pytest.raises(ValueError, match="control_mode: applies to one ControlNet Union, alone in its stage"):
        StageSpec(kind="text_to_image", model=TINY, controlnet=[union, union], control_mode=[3])
    assert StageSpec(kind="text_to_image", model=TINY, controlnet=union, control_mode=[0, 5]).control_models == 2


def test_a_union_saved_under_controlnetmodels_name_is_known_by_its_weights(models, tmp_path):
    """xinsir's published SDXL Union names ControlNetModel in its config.json: its control-type
    embedding in the weights makes it a Union all the same."""
    folder = tmp_path / "xinsir-layout"
    shutil.copytree(models["sdxl_union"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "ControlNetModel"}))
    assert controlnet.model_class(folder) == "ControlNetUnionModel"
    assert controlnet.model_class(models["sdxl_controlnet"]) == "ControlNetModel"


@pytest.fixture(scope="module")
def flux_control_model(tmp_path_factory):
    return saved(flux_control)(tmp_path_factory.mktemp("flux-control"))


@pytest.mark.parametrize("kind", ["text_to_image", "image_to_image", "inpainting"])
def test_a_flux_control_model_reads_the_control_image(kind, flux_control_model, tmp_path):
    """A saved FluxControlPipeline as the model (FLUX.1 Canny/Depth: no ControlNet, the transformer
    reads the control image): two control images give two images, the same one the same image; a
    missing or wrong-sized one is an error row naming the column."""
    inputs = {"image_to_image": {"image": picture()}, "inpainting": {"image": picture(), "mask": square(32, 8, 24)},
              "text_to_image": {}}[kind]
    a, b = square(32, 4, 12), square(32, 16, 30)
    rows = [{"id": f"r{i}", "prompt": PROMPTS[0], "seed": 3, "control_image": c, **inputs}
            for i, c in enumerate((a, b, a, None, square(16, 4, 12)))]
    out = run(StageSpec(kind=kind, model=str(flux_control_model), **FAST), rows, tmp_path)
    assert values(out, "status") == ["ok"] * 3 + ["error"] * 2
    got = values(out, columns.PIXELS)
    assert gap(got[0], got[1]) > 2 and got[0] == got[2]
    pipeline = {"text_to_image": "FluxControlPipeline", "image_to_image": "FluxControlImg2ImgPipeline",
                "inpainting": "FluxControlInpaintPipeline"}[kind]
    assert values(out, "error")[3:] == [f"{kind}: ValueError: control_image: missing (this stage's {pipeline} takes a "
                                        "control image)",
                                        "control_image: size 16x16 differs from the 32x32 image the stage makes"]
    (record,) = json.loads(values(out, columns.STAGE_PARAMS)[0])
    assert record["pipeline"] == pipeline and record["flux_control"] == {"control_image": "manifest"}


def test_a_flux_control_model_takes_canny_made_from_the_rows_image(flux_control_model, tmp_path):
    spec = StageSpec(kind="image_to_image", model=str(flux_control_model), control={"from": "image", "kind": "canny"},
                     **FAST)
    rows = [{"id": f"r{i}", "prompt": PROMPTS[0], "seed": 3, "image": im}
            for i, im in enumerate((square(32, 4, 12), square(32, 14, 28), square(32, 4, 12)))]
    out = run(spec, rows, tmp_path)
    got = images(out)
    assert got[0] == got[2] and gap(got[0], got[1]) > 2
    assert json.loads(values(out, columns.STAGE_PARAMS)[0])[0]["flux_control"] == {"control_image": "canny"}


def test_a_flux_control_model_refuses_controlnet_settings(flux_control_model, tmp_path):
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompt_rows())
    stage = {"kind": "text_to_image", "model": str(flux_control_model), "controlnet_scale": 0.5, "control_end": 0.8}
    with pytest.raises(ModelError, match="control_end, controlnet_scale: FluxControlPipeline takes no "
                                         "control_guidance_end, controlnet_conditioning_scale; leave them unset"):
        check_sources(parse_spec({"manifest": manifest, "output": str(tmp_path / "out"), "stages": [stage]}))


def test_controlnet_on_a_stage_kind_without_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="controlnet: super_resolution stages take no ControlNet"):
        StageSpec(kind="super_resolution", model=TINY, controlnet="./cn")
    # Whether anything reads a computed control image depends on the model: refused on the driver.
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompt_rows())
    stage = {"kind": "text_to_image", "model": TINY, "control": {"kind": "canny"}}
    with pytest.raises(ModelError, match="control: makes a control image for a ControlNet, a T2I-Adapter or a "
                                         "FLUX.1 Control model"):
        check_sources(parse_spec({"manifest": manifest, "output": str(tmp_path / "out"), "stages": [stage]}))


# -- IP-Adapter -------------------------------------------------------------------------------------


def noise_png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_the_reference_image_steers_the_image_and_scale_zero_is_the_base_model(models, base_images, tmp_path):
    """Same prompt and seed: two reference images give two images, the same one the same image
    (rows grouped per reference into calls); at scale 0 the base model's images byte for byte."""
    a, b = noise_png(0), noise_png(1)
    rows = [{"id": f"r{i}", "prompt": PROMPTS[0], "seed": 7, "reference_image": r} for i, r in enumerate((a, b, a))]
    spec = t2i(TINY, ip_adapter=str(models["ip_adapter"]), ip_adapter_scale=1.0, batch_size=3)
    out = run(spec, rows, tmp_path)
    got = images(out)
    assert got[0] == got[2] and gap(got[0], got[1]) > 2 and gap(got[0], base_images[0]) > 2
    (record,) = json.loads(values(out, columns.STAGE_PARAMS)[0])
    assert record["ip_adapter"] == {"model": str(models["ip_adapter"]), "weight_name": None, "scale": 1.0}
    zero = t2i(TINY, ip_adapter=str(models["ip_adapter"]), ip_adapter_scale=0.0)
    assert images(run(zero, rows[:2], tmp_path)) == [base_images[0]] * 2
    missing = run(spec, [{"id": "r", "prompt": PROMPTS[0], "reference_image": None}], tmp_path)
    assert values(missing, "error") == ["reference_image: missing"]


@pytest.fixture(scope="module")
def dit_ip_adapters(dit_models, tmp_path_factory):
    """IP-Adapters for the tiny FLUX.1 (XLabs' format) and SD3 (InstantX's) of dit_models."""
    root = tmp_path_factory.mktemp("dit-ip-adapters")
    return {"flux": flux_ip_adapter_for(dit_models["flux"], root / "flux"),
            "sd3": sd3_ip_adapter_for(dit_models["sd3"], root / "sd3")}


@pytest.mark.parametrize("family,kind,settings", [
    ("flux", "text_to_image", {}), ("flux", "text_to_image", {"true_cfg_scale": 2.0}), ("flux", "inpainting", {}),
    ("sd3", "text_to_image", {}), ("sd3", "image_to_image", {})])
def test_flux_and_sd3_ip_adapters_follow_the_reference_image(family, kind, settings, dit_models, dit_ip_adapters,
                                                              tmp_path):
    """FLUX.1's IP-Adapter (a CLIP encoder; with true CFG too, whose negative pass sees diffusers'
    black reference) and SD3's (a SigLIP encoder), same prompt and seed: two reference images give
    two images, the same one the same image; at scale 0 the base model's image byte for byte."""
    inputs = {"image_to_image": {"image": picture()}, "inpainting": {"image": picture(), "mask": square(32, 8, 24)},
              "text_to_image": {}}[kind]
    model, adapter = str(dit_models[family]), str(dit_ip_adapters[family])
    a, b = noise_png(0), noise_png(1)
    rows = [{"id": f"r{i}", "prompt": PROMPTS[0], "negative_prompt": "blurry", "seed": 7, "reference_image": r,
             **inputs} for i, r in enumerate((a, b, a))]

    def stage(**extra):
        return StageSpec(kind=kind, model=model, **FAST, **settings, **extra)

    out = run(stage(ip_adapter=adapter, ip_adapter_scale=1.0, batch_size=3), rows, tmp_path)
    got = images(out)
    base = images(run(stage(), rows[:1], tmp_path))
    assert got[0] == got[2] and gap(got[0], got[1]) > 2 and gap(got[0], base[0]) > 2
    (record,) = json.loads(values(out, columns.STAGE_PARAMS)[0])
    assert record["ip_adapter"] == {"model": adapter, "weight_name": None, "scale": 1.0}
    assert images(run(stage(ip_adapter=adapter, ip_adapter_scale=0.0), rows[:2], tmp_path)) == base * 2


def test_an_ip_adapter_of_another_family_or_without_its_image_processor_is_refused(models, dit_models,
                                                                                  dit_ip_adapters, tmp_path):
    no_processor = tmp_path / "no-processor"
    shutil.copytree(dit_ip_adapters["sd3"], no_processor)
    (no_processor / "image_encoder" / "preprocessor_config.json").unlink()
    cases = ((TINY, dit_ip_adapters["flux"], "is not an IP-Adapter's weights of this family's format"),
             (dit_models["sd3"], models["ip_adapter"], "has no image_encoder/ holding a SiglipVisionModel"),
             (dit_models["sd3"], no_processor, "SiglipVisionModel in safetensors with its preprocessor_config.json"),
             (dit_models["flux"], dit_ip_adapters["sd3"], "has no image_encoder/ holding a "
                                                          "CLIPVisionModelWithProjection"))
    for model, source, message in cases:
        stage = {"kind": "text_to_image", "model": str(model), "ip_adapter": str(source)}
        spec = parse_spec({"manifest": str(tmp_path / "m.parquet"), "output": str(tmp_path / "out"),
                           "stages": [stage]})
        with pytest.raises(ModelError, match=message):
            check_sources(spec)


def test_an_ip_adapter_folder_is_checked_on_the_driver(models, tmp_path):
    no_encoder = tmp_path / "no-encoder"
    no_encoder.mkdir()
    shutil.copy(models["ip_adapter"] / "ip-adapter.safetensors", no_encoder)
    lora_folder = tmp_path / "lora"  # safetensors beside an encoder, but a LoRA's
    shutil.copytree(models["ip_adapter"] / "image_encoder", lora_folder / "image_encoder")
    shutil.copy(models["lora"], lora_folder)
    cases = ((no_encoder, {}, "has no image_encoder/ holding a CLIPVisionModelWithProjection"),
             (lora_folder, {}, "is not an IP-Adapter's weights"),
             (models["ip_adapter"], {"t2i_adapter": str(models["t2i_adapter"])},
              "diffusers' StableDiffusionAdapterPipeline takes no IP-Adapter"))
    for source, extra, message in cases:
        stage = {"kind": "text_to_image", "model": TINY, "ip_adapter": str(source), **extra}
        spec = parse_spec({"manifest": str(tmp_path / "m.parquet"), "output": str(tmp_path / "out"),
                           "stages": [stage]})
        with pytest.raises(ModelError, match=message):
            check_sources(spec)
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompt_rows())
    with pytest.raises(ManifestError, match=r"lacks required column\(s\) \['reference_image'\]"):
        manifest_check(parse_spec({"manifest": manifest, "output": str(tmp_path / "out"), "stages": [
            {"kind": "text_to_image", "model": TINY, "ip_adapter": str(models["ip_adapter"])}]}))


# -- T2I-Adapter ------------------------------------------------------------------------------------


def test_a_t2i_adapter_follows_the_control_image(models, tmp_path):
    spec = t2i("builtin:shapes-t2i", t2i_adapter=str(models["t2i_adapter"]))
    a, b = square(32, 4, 12), square(32, 16, 30)
    rows = [{"id": f"r{i}", "prompt": PROMPTS[0], "seed": 3, "control_image": c} for i, c in enumerate((a, b, a))]
    out = run(spec, rows, tmp_path)
    got = images(out)
    assert got[0] == got[2] and gap(got[0], got[1]) > 2
    (record,) = json.loads(values(out, columns.STAGE_PARAMS)[0])
    assert record["pipeline"] == "StableDiffusionAdapterPipeline"
    assert record["t2i_adapter"] == {"model": str(models["t2i_adapter"]), "scale": 1.0, "control_image": "manifest"}
    base = images(run(t2i("builtin:shapes-t2i"), rows[:2], tmp_path))
    zero = images(run(t2i("builtin:shapes-t2i", t2i_adapter=str(models["t2i_adapter"]), controlnet_scale=0.0),
                      rows[:2], tmp_path))
    assert zero == base


def test_t2i_adapter_rules():
    with pytest.raises(ValueError, match="t2i_adapter: image_to_image stages take no T2I-Adapter"):
        StageSpec(kind="image_to_image", model=TINY, t2i_adapter="./a")
    with pytest.raises(ValueError, match="a ControlNet or a T2I-Adapter, not both"):
        StageSpec(kind="text_to_image", model=TINY, t2i_adapter="./a", controlnet="./c")
    with pytest.raises(ValueError, match="a T2I-Adapter applies at every step"):
        StageSpec(kind="text_to_image", model=TINY, t2i_adapter="./a", control_end=0.5)


# -- control images made on CPU ---------------------------------------------------------------------


def test_canny_draws_the_outline_of_a_shape():
    image = np.asarray(Image.open(io.BytesIO(square(32, 8, 24))))
    edges = canny(image, ControlSpec(kind="canny"))
    assert edges.shape == (32, 32, 3) and set(np.unique(edges)) == {0, 255}
    across = set(np.flatnonzero(edges[16, :, 0]))  # a row through the square: its left and right sides
    assert across & {7, 8} and across & {23, 24} and across <= {7, 8, 23, 24}
    assert (edges[..., 0] == edges[..., 2]).all()


def test_control_from_the_rows_image_on_image_to_image(models, tmp_path):
    spec = StageSpec(kind="image_to_image", model=TINY, controlnet=str(models["controlnet"]),
                     control={"from": "image", "kind": "canny"}, **FAST)
    rows = [{"id": f"r{i}", "prompt": PROMPTS[0], "seed": 3, "image": im}
            for i, im in enumerate((square(32, 4, 12), square(32, 14, 28), square(32, 4, 12)))]
    out = run(spec, rows, tmp_path)
    got = images(out)
    assert got[0] == got[2] and gap(got[0], got[1]) > 2
    (record,) = json.loads(values(out, columns.STAGE_PARAMS)[0])
    assert record["pipeline"] == "StableDiffusionControlNetImg2ImgPipeline"
    assert record["controlnet"]["control_image"] == "canny"


# -- the segmentation recipe, end to end on real Ray ------------------------------------------------


def label_png(label_map: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(label_map.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_segmentation_recipe_from_label_maps_to_webdataset_pairs(models, tmp_path, ray_local):
    """Label maps -> `manifest synth --control-maps` -> a ControlNet job (with a LoRA) on Ray ->
    WebDataset tars whose samples pair each image with its label map."""
    import webdataset as wds

    from pipeline.cli import main as cli
    from pipeline.export import export_webdataset
    from pipeline.job import run_job
    from pipeline.synth.control_maps import palette
    from tests.helpers import read_output

    maps = tmp_path / "maps"
    maps.mkdir()
    expected = {}
    for k, (lo, hi, cls) in enumerate(((4, 14, 1), (10, 28, 2), (2, 30, 1))):
        label = np.zeros((32, 32), dtype=np.uint8)
        label[lo:hi, lo:hi] = cls
        label[:3, :3] = 2 if k == 2 else 0  # the third map holds both classes
        (maps / f"scene-{k}.png").write_bytes(label_png(label))
        expected[f"scene-{k}"] = label
    (tmp_path / "classes.yaml").write_text("[background, circle, square]\n")
    (tmp_path / "templates.yaml").write_text("templates: ['a {colour} {class} on a white background']\n"
                                             "slots: {colour: [red, blue]}\n")
    manifest = str(tmp_path / "m.parquet")
    assert cli(["manifest", "synth", "--control-maps", str(maps), "--classes", str(tmp_path / "classes.yaml"),
                "--templates", str(tmp_path / "templates.yaml"), "--splits", "train=1", "--output", manifest]) == 0
    spec = parse_spec({"manifest": manifest, "output": str(tmp_path / "out"),
                       "stages": [{"kind": "text_to_image", "model": TINY, "controlnet": str(models["controlnet"]),
                                   "loras": [{"source": str(models["lora"]), "scale": 0.5}], **FAST}]})
    stats = run_job(spec, log=lambda _: None)
    assert (stats.rows, stats.ok) == (3, 3)
    rows = {r["id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    assert rows["scene-2"]["prompt"].endswith("circle and square on a white background")
    assert rows["scene-0"]["classes_present"] == ["circle"]
    control = np.asarray(Image.open(io.BytesIO(rows["scene-1"]["control_image"])))
    assert tuple(control[20, 20]) == palette(2) and tuple(control[0, 0]) == palette(0)
    (record,) = json.loads(rows["scene-0"]["stage_params"])
    assert record["controlnet"]["models"] == [str(models["controlnet"])] and record["loras"][0]["scale"] == 0.5

    export_webdataset(str(tmp_path / "out"), str(tmp_path / "wds"), log=lambda *_: None)
    samples = list(wds.WebDataset(str(tmp_path / "wds" / "train-000000.tar"), shardshuffle=False).decode("pil"))
    assert len(samples) == 3
    for sample in samples:
        assert sample["png"].size == (32, 32)
        # The "pil" decoder makes every PNG RGB; the class indices are each channel's values.
        assert np.array_equal(np.asarray(sample["label_map.png"].convert("L")), expected[sample["json"]["id"]])
    # `datasets` reads the same pairs, typed by the export's card: the map is an Image feature.
    import datasets

    ds = datasets.load_dataset(str(tmp_path / "wds"), split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["label_map.png"], datasets.Image) and len(ds) == 3
    for sample in ds:
        assert np.array_equal(np.asarray(sample["label_map.png"].convert("L")), expected[sample["json"]["id"]])
