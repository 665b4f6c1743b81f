"""Every model family through every stage kind it serves, with tiny random-weight pipelines built
offline (tests/tiny_pipelines.py).

The per-kind contract runs each stage class in process, as a Ray actor would run it: all rows
ok, images at the size the kind promises, the same images at batch size 1 and 3 (batch-invariant,
as on CPUs), a batched call (as on GPUs) that works too, and a stage_params record naming the
family and its pipeline. Prompt embeddings pass between stages only where the text encoders are
identical. A few jobs run end to end on real Ray: cascades across families and an unconditional
model from a manifest of ids. A model that no stage of its kind can run is refused on the driver.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image

from pipeline import columns
from pipeline.access import policy
from pipeline.errors import ModelError
from pipeline.families import FAMILIES, check_family, families_for
from pipeline.job import run_job
from pipeline.kinds import KINDS
from pipeline.prepare import prepare_batch
from pipeline.spec import LimitsSpec, StageSpec, StorageSpec, parse_spec
from pipeline.stages import stage_class
from pipeline.tables import raw_images, values
from tests.helpers import half_mask, png, read_output, subprocess_env, write_manifest
from tests.tiny_pipelines import build_all

FAST = {"steps": 2, "cpus_per_actor": 0.2}
PROMPTS = ["a red circle on a blue background", "a green square", "a yellow star on a white background"]

# (model, kind, side of the output image): every family through every kind it serves. The SD 1.x
# family is the built-in tiny models'.
CASES = [
    ("builtin:tiny-sd", "text_to_image", 32),
    ("builtin:tiny-sd", "image_to_image", 32),
    ("builtin:tiny-sd", "inpainting", 32),
    ("builtin:tiny-inpaint", "inpainting", 32),
    ("builtin:tiny-upscaler", "super_resolution", 64),
    ("sdxl", "text_to_image", 32),
    ("sdxl", "image_to_image", 32),
    ("sdxl", "inpainting", 32),
    ("sdxl-refiner", "image_to_image", 32),
    ("sdxl-inpaint", "inpainting", 32),
    ("sd3", "text_to_image", 32),
    ("sd3", "image_to_image", 32),
    ("sd3", "inpainting", 32),
    ("flux", "text_to_image", 32),
    ("flux", "image_to_image", 32),
    ("flux", "inpainting", 32),
    ("flux-dev", "text_to_image", 32),
    ("flux-fill", "inpainting", 32),
    ("pixart-sigma", "text_to_image", 32),
    ("latent-upscaler", "super_resolution", 32),
    ("ddpm", "unconditional", 16),
    ("ldm", "unconditional", 16),
]
FAMILY_OF = {"builtin:tiny-sd": "sd", "builtin:tiny-inpaint": "sd-inpaint", "builtin:tiny-upscaler": "sd-x4-upscaler",
             "flux-dev": "flux", "latent-upscaler": "sd-latent-upscaler"}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, str]:
    """Every tiny family pipeline, saved once: {name: folder}; built-in names map to themselves."""
    folders = build_all(tmp_path_factory.mktemp("families"))
    return {**folders, **{m: m for m, _, _ in CASES if m.startswith("builtin:")}}


def stage_spec(model: str, kind: str, **extra) -> StageSpec:
    return StageSpec(kind=kind, model=model, width=32, height=32, strength=0.75, **FAST, **extra)


def manifest_rows(kind: str, n: int = 3) -> pa.Table:
    """``n`` rows that a flow starting with ``kind`` can take."""
    side = 16 if kind == "super_resolution" else 32
    rows = [{"id": f"r{i}", "prompt": PROMPTS[i % 3], "negative_prompt": "blurry" if i == 1 else None,
             "image": png(side, i), "mask": half_mask(side)} for i in range(n)]
    return pa.Table.from_pylist(rows)


def prepared(flow: list[StageSpec], table: pa.Table, tmp_path: Path) -> pa.Table:
    access = policy(str(tmp_path / "manifest.parquet"), False, [])  # every image is inline bytes
    return prepare_batch(table, flow, StorageSpec(), access, LimitsSpec())


def pixels(table: pa.Table) -> list[bytes]:
    return values(table, columns.PIXELS)


@pytest.fixture(scope="module", params=CASES, ids=[f"{m.removeprefix('builtin:')}-{k}" for m, k, _ in CASES])
def ran(request, tiny, tmp_path_factory):
    """One stage of one family, run on the same three rows: in one batch (batch-invariant, the
    CPU default), one row at a time, and as one batched call (as on a GPU)."""
    model, kind, side = request.param
    spec = stage_spec(tiny[model], kind)
    stage = stage_class(kind)(spec, StorageSpec())
    table = prepared([spec], manifest_rows(kind), tmp_path_factory.mktemp("rows"))
    together = stage(table)
    alone = [stage(table.slice(i, 1)) for i in range(table.num_rows)]
    stage.batch_invariant = False
    batched = stage(table)
    return {"model": model, "kind": kind, "side": side, "input": table, "together": together, "alone": alone,
            "batched": batched}


class TestStageContract:
    """What every family promises in every stage kind it serves."""

    def test_all_rows_ok(self, ran):
        for out in (ran["together"], ran["batched"], *ran["alone"]):
            assert values(out, "status") == ["ok"] * out.num_rows, values(out, "error")

    def test_images_at_the_kinds_size_and_inpainting_keeps_unmasked_pixels(self, ran):
        side = ran["side"]
        for out in (ran["together"], ran["batched"]):
            assert values(out, "width") == values(out, "height") == [side] * 3
            assert [im.shape for im in raw_images(out)] == [(side, side, 3)] * 3
        assert len(set(pixels(ran["together"]))) == 3  # different rows, different images
        if ran["kind"] == "inpainting":  # the black half of the mask is kept exactly, the white half repainted
            for out, original in zip(raw_images(ran["together"]), raw_images(ran["input"])):
                assert np.array_equal(out[:, :16], original[:, :16])
                assert not np.array_equal(out[:, 16:], original[:, 16:])

    def test_same_images_at_batch_size_1_and_3(self, ran):
        assert pixels(ran["together"]) == [pixels(out)[0] for out in ran["alone"]]

    def test_record_names_family_and_pipeline(self, ran):
        family = next(f for f in FAMILIES if f.name == FAMILY_OF.get(ran["model"], ran["model"]))
        records = [json.loads(p) for p in values(ran["together"], columns.STAGE_PARAMS)]
        for (record,) in records:
            assert (record["kind"], record["family"], record["pipeline"]) == (
                ran["kind"], family.name, family.pipelines[ran["kind"]])
            assert record["steps"] == 2 and (record["width"], record["height"]) == (ran["side"], ran["side"])
            if "prompt" in KINDS[ran["kind"]].inputs:
                assert record["text_embeds"] == ("pipeline" if family.encode is None else "computed")
            else:
                assert "text_embeds" not in record and "guidance_scale" not in record


def test_every_kind_has_its_stage_class():
    for name, kind in KINDS.items():
        assert stage_class(name).kind == name
        assert set(kind.manifest_columns) <= {"prompt", "image", "mask"}


def test_every_family_and_kind_is_covered():
    from tests.test_families_generic import CASES as GENERIC_CASES

    served = {(f.name, k) for f in FAMILIES for k in f.pipelines}
    tested = {(FAMILY_OF.get(m, m), k) for m, k, _ in CASES} | {(family, k) for _, k, _, family, _ in GENERIC_CASES}
    assert served <= tested
    assert all(k in KINDS for _, k in served)


def test_family_call_arguments(tiny, tmp_path):
    """Guidance semantics, T5 length, SDXL's micro-conditioning and PixArt's binning are recorded."""
    expect = {
        "sdxl": {"guidance": "classifier-free", "original_size": [32, 32], "target_size": [32, 32]},
        "flux": {"guidance": "none (guidance-distilled)", "max_sequence_length": 512},
        "flux-dev": {"guidance": "embedded", "max_sequence_length": 64},
        "sd3": {"guidance": "classifier-free", "max_sequence_length": 256},
        "pixart-sigma": {"use_resolution_binning": False, "max_sequence_length": 300},
    }
    for name, fields in expect.items():
        extra = {"max_sequence_length": 64} if name == "flux-dev" else {}
        spec = stage_spec(tiny[name], "text_to_image", **extra)
        out = stage_class("text_to_image")(spec, StorageSpec())(prepared([spec], manifest_rows("text_to_image", 1),
                                                                          tmp_path))
        record = json.loads(values(out, columns.STAGE_PARAMS)[0])[0]
        assert {k: record[k] for k in fields} == fields, name


def test_flux_true_cfg_uses_the_negative_prompt(tiny, tmp_path):
    table = manifest_rows("text_to_image", 2)
    table = table.set_column(table.schema.get_field_index("negative_prompt"), "negative_prompt",
                             pa.array(["blurry", "dark"]))
    images = {}
    for cfg in (None, 3.0):
        spec = stage_spec(tiny["flux-dev"], "text_to_image", true_cfg_scale=cfg)
        out = stage_class("text_to_image")(spec, StorageSpec())(prepared([spec], table, tmp_path))
        assert values(out, "status") == ["ok", "ok"]
        images[cfg] = pixels(out)
        assert json.loads(values(out, columns.STAGE_PARAMS)[0])[0].get("true_cfg_scale") == cfg
    assert images[None][0] != images[3.0][0]


CHAINS = [
    # (first model, first kind, second model, second kind, how the second stage got its embeddings)
    ("flux", "text_to_image", "flux-fill", "inpainting", "reused"),  # FLUX.1 and Fill share CLIP-L and T5
    ("sdxl", "text_to_image", "sdxl", "image_to_image", "reused"),
    ("builtin:tiny-sd", "text_to_image", "builtin:tiny-upscaler", "super_resolution", "reused"),
    ("flux", "text_to_image", "sdxl-refiner", "image_to_image", "computed"),  # other text encoders
    ("sdxl", "text_to_image", "sdxl-refiner", "image_to_image", "computed"),  # the refiner has CLIP-G only
    ("sdxl", "text_to_image", "builtin:tiny-upscaler", "super_resolution", "computed"),
    ("pixart-sigma", "text_to_image", "builtin:tiny-upscaler", "super_resolution", "computed"),
]


@pytest.mark.parametrize("first, first_kind, second, second_kind, source", CHAINS,
                         ids=[f"{a.removeprefix('builtin:')}-{c.removeprefix('builtin:')}" for a, _, c, _, _ in CHAINS])
def test_embeddings_pass_only_between_identical_text_encoders(tiny, tmp_path, first, first_kind, second,
                                                              second_kind, source):
    flow = [stage_spec(tiny[first], first_kind), stage_spec(tiny[second], second_kind)]
    table = prepared(flow, manifest_rows(first_kind, 2), tmp_path)
    made = stage_class(first_kind)(flow[0], StorageSpec(), 0, keep_text_embeds=True)(table)
    second_stage = stage_class(second_kind)(flow[1], StorageSpec(), 1)
    out = second_stage(made)
    assert values(out, "status") == ["ok", "ok"], values(out, "error")
    records = [json.loads(p) for p in values(out, columns.STAGE_PARAMS)]
    assert [r[1]["text_embeds"] for r in records] == [source] * 2
    if source == "reused":
        # The same images as from embeddings computed on the spot: reuse changes nothing but the work.
        fresh = second_stage(made.drop_columns([columns.TEXT_ENCODER]).append_column(
            columns.TEXT_ENCODER, pa.nulls(made.num_rows, pa.string())))
        assert [json.loads(p)[1]["text_embeds"] for p in values(fresh, columns.STAGE_PARAMS)] == ["computed"] * 2
        assert pixels(fresh) == pixels(out)


MISMATCHES = [
    ("pixart-sigma", "inpainting", "PixArtSigmaPipeline"),
    ("builtin:tiny-upscaler", "text_to_image", "StableDiffusionUpscalePipeline"),
    ("sdxl-refiner", "text_to_image", "StableDiffusionXLImg2ImgPipeline"),
    ("ddpm", "image_to_image", "DDPMPipeline"),
    ("flux-fill", "text_to_image", "FluxFillPipeline"),
]


@pytest.mark.parametrize("model, kind, pipeline", MISMATCHES)
def test_family_mismatch_is_refused(tiny, model, kind, pipeline):
    from pipeline.models.resolve import resolve

    index = json.loads((resolve(tiny[model]) / "model_index.json").read_text())
    with pytest.raises(ModelError) as err:
        check_family(tiny[model], index, StageSpec(kind=kind, model=tiny[model]))
    message = str(err.value)
    assert pipeline in message and f"{kind} stages run" in message
    assert all(f.title in message for f in families_for(kind))


def test_unknown_pipeline_and_true_cfg_elsewhere_are_refused(tiny):
    with pytest.raises(ModelError, match="KandinskyV22Pipeline \\(no family shardgen knows\\)"):
        check_family("m", {"_class_name": "KandinskyV22Pipeline"}, StageSpec(kind="text_to_image", model="m"))
    index = json.loads((Path(tiny["sdxl"]) / "model_index.json").read_text())
    with pytest.raises(ModelError, match="^true_cfg_scale: StableDiffusionXLPipeline"):
        check_family("m", index, StageSpec(kind="text_to_image", model="m", true_cfg_scale=4))


def test_mismatch_exits_2_through_the_cli_before_any_actor(tiny, tmp_path):
    manifest = write_manifest(str(tmp_path / "m.parquet"), manifest_rows("inpainting", 2))
    spec = tmp_path / "spec.yaml"
    output = tmp_path / "out"
    spec.write_text(yaml.safe_dump({
        "manifest": manifest, "output": str(output),
        "stages": [{"kind": "text_to_image", "model": tiny["flux"]},
                   {"kind": "inpainting", "model": tiny["pixart-sigma"]}]}))
    # RAY_ADDRESS=local: with an empty address the CLI joins whatever `ray start` cluster runs on the
    # machine (another test's head, on the other xdist worker) instead of refusing first.
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--spec", str(spec)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "is a PixArtSigmaPipeline (the PixArt-Σ family)" in done.stderr
    assert "inpainting stages run" in done.stderr and "FLUX.1 Fill" in done.stderr
    assert not output.exists()  # refused before the job wrote anything or started Ray
    assert "Started a local Ray instance" not in done.stdout + done.stderr


@pytest.mark.parametrize("example", sorted((Path(__file__).parents[1] / "examples" / "models").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_example_specs_are_valid(example):
    spec = parse_spec(yaml.safe_load(example.read_text()))
    assert all(s.model and not s.model.startswith("builtin:") for s in spec.all_stages())


@pytest.fixture(scope="module")
def cascades(tiny, tmp_path_factory, ray_local):
    """One streaming job on real Ray: cascades across families, and an unconditional model fed a
    manifest of ids alone."""
    folder = tmp_path_factory.mktemp("cascades")
    stage = lambda model, kind, **kw: {"kind": kind, "model": tiny[model], **FAST, "batch_size": 2, "width": 32,  # noqa: E731
                                      "height": 32, **kw}
    spec = parse_spec({
        "manifest": str(folder / "m.parquet"),
        "output": str(folder / "out"),
        "overrides": ["steps"],
        "flows": {
            "sdxl_x4": [stage("sdxl", "text_to_image"), stage("builtin:tiny-upscaler", "super_resolution")],
            "flux_refiner": [stage("flux", "text_to_image"), stage("sdxl-refiner", "image_to_image", strength=0.5)],
            "ddpm": [stage("ddpm", "unconditional", scheduler="ddim")],
        },
    })
    rows = [{"id": f"{task}-{i}", "task": task, "prompt": PROMPTS[i] if task in ("sdxl_x4", "flux_refiner")
             else None, "seed": 7 if i == 0 else None, "steps": 3 if task == "ddpm" and i == 1 else None}
            for task in spec.flows for i in range(2)]
    write_manifest(spec.manifest, rows)
    stats = run_job(spec)
    return stats, {r["id"]: r for r in read_output(spec.output).to_pylist()}


def test_cascades_across_families(cascades):
    stats, out = cascades
    assert (stats.rows, stats.ok) == (6, 6), [r["error"] for r in out.values()]
    expect = {"sdxl_x4": (128, ["text_to_image", "super_resolution"], ["sdxl", "sd-x4-upscaler"]),
              "flux_refiner": (32, ["text_to_image", "image_to_image"], ["flux", "sdxl-refiner"])}
    for task, (side, stages, families) in expect.items():
        for i in range(2):
            row = out[f"{task}-{i}"]
            image = Image.open(io.BytesIO(row["image"]["bytes"]))
            assert (image.size, row["stages"]) == ((side, side), stages)
            records = json.loads(row["stage_params"])
            assert [r["family"] for r in records] == families
            assert [r["text_embeds"] for r in records] == ["computed", "computed"]


def test_unconditional_from_ids_alone(cascades):
    _, out = cascades
    for i in range(2):
        row = out[f"ddpm-{i}"]
        assert row["status"] == "ok" and row["prompt"] == "" and row["guidance_scale"] is None
        assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (16, 16)
        (record,) = json.loads(row["stage_params"])
        assert (record["kind"], record["pipeline"]) == ("unconditional", "DDPMPipeline")
    assert out["ddpm-0"]["seed"] == 7 and out["ddpm-1"]["steps"] == 3 and out["ddpm-0"]["steps"] == 2
    assert json.loads(out["ddpm-0"]["stage_params"])[0]["scheduler"] == "DDIMScheduler"
