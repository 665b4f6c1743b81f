"""The families beyond tests/test_families.py: pipelines found through diffusers' AutoPipeline
mappings (the generic path), the DeepFloyd IF cascade, a checkpoint that ships a safety checker, and
the size guard.

Each family runs in process through every kind it is tested in, on tiny random-weight pipelines
saved by tests/tiny_families_more.py (and tests/tiny_families.py where present), as a Ray actor
would run the stage: all rows ok, the asked size, the same images at batch size 1 and 3, and a
record that names the family and pipeline of the literal table below (not the code's own table).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import columns
from pipeline.errors import ModelError
from pipeline.families import check_family, size_problem, size_warning
from pipeline.job import run_job
from pipeline.models.resolve import check_sources
from pipeline.spec import StageSpec, StorageSpec, parse_spec
from pipeline.stages import stage_class
from pipeline.tables import raw_images, values
from tests.helpers import read_output, write_manifest
from tests.test_families import manifest_rows, pixels, prepared
from tests.test_stages import half_mask, png
from tests.tiny_families import FAMILY_BUILDERS
from tests.tiny_families_more import MORE_BUILDERS

REGISTRY = {**FAMILY_BUILDERS, **MORE_BUILDERS}
FAST = {"steps": 2, "cpus_per_actor": 0.2}

# (tiny model, kind, asked side, family, pipeline class): written out here, not read from the code.
CASES = [
    ("flux2-klein", "text_to_image", 32, "flux2-klein", "Flux2KleinPipeline"),
    ("flux2-klein", "image_to_image", 64, "flux2-klein", "Flux2KleinPipeline"),  # FLUX.2 reads 64 px and up
    ("qwen-image", "text_to_image", 32, "qwenimage", "QwenImagePipeline"),
    ("qwen-image", "image_to_image", 32, "qwenimage", "QwenImageImg2ImgPipeline"),
    ("qwen-image", "inpainting", 32, "qwenimage", "QwenImageInpaintPipeline"),
    ("z-image", "text_to_image", 32, "z-image", "ZImagePipeline"),
    ("z-image", "image_to_image", 32, "z-image", "ZImageImg2ImgPipeline"),
    ("z-image", "inpainting", 32, "z-image", "ZImageInpaintPipeline"),
    ("sana", "text_to_image", 32, "sana", "SanaPipeline"),
    ("chroma", "text_to_image", 32, "chroma", "ChromaPipeline"),
    ("aura-flow", "text_to_image", 32, "auraflow", "AuraFlowPipeline"),
    ("lumina2", "text_to_image", 32, "lumina2", "Lumina2Pipeline"),
    ("cogview4", "text_to_image", 32, "cogview4", "CogView4Pipeline"),
    ("hunyuan-dit", "text_to_image", 32, "hunyuan", "HunyuanDiTPipeline"),
    ("kolors", "text_to_image", 32, "kolors", "KolorsPipeline"),
    ("kolors", "image_to_image", 32, "kolors", "KolorsImg2ImgPipeline"),
    ("hunyuan-image-2.1", "text_to_image", 32, "hunyuanimage", "HunyuanImagePipeline"),
    ("flux-kontext", "text_to_image", 32, "flux-kontext", "FluxKontextPipeline"),
    ("flux-kontext", "image_to_image", 32, "flux-kontext", "FluxKontextPipeline"),
    ("kandinsky3", "text_to_image", 64, "kandinsky3", "Kandinsky3Pipeline"),
    ("kandinsky3", "image_to_image", 64, "kandinsky3", "Kandinsky3Img2ImgPipeline"),
    ("wuerstchen", "text_to_image", 128, "wuerstchen", "WuerstchenCombinedPipeline"),
    ("stable-cascade", "text_to_image", 128, "cascade", "StableCascadeCombinedPipeline"),
    ("if-stage-1", "text_to_image", 16, "if", "IFPipeline"),
    ("if-stage-1", "image_to_image", 16, "if", "IFImg2ImgPipeline"),
    ("if-stage-2", "super_resolution", 64, "if-sr", "IFSuperResolutionPipeline"),
    # HiDream generates at its native area whatever the size asked (the tiny one's is 128x128).
    ("hidream", "text_to_image", 128, "hidream", "HiDreamImagePipeline"),
]

def test_every_tiny_pipeline_is_a_case():
    assert {c[0] for c in CASES} == set(REGISTRY) - {"sd-flag-everything"}


@pytest.fixture(scope="session")
def tiny_more(tmp_path_factory):
    """Each tiny pipeline, built once per session when first asked for: {name: folder}."""
    root = tmp_path_factory.mktemp("tiny-more")
    built: dict[str, str] = {}

    def folder(name: str) -> str:
        if name not in built:
            built[name] = str(REGISTRY[name](root / name))
        return built[name]

    return folder


def spec_for(model: str, kind: str, side: int, **extra) -> StageSpec:
    return StageSpec(kind=kind, model=model, width=side, height=side, strength=0.75, **FAST, **extra)


def rows_at(kind: str, side: int, n: int = 3):
    """``n`` rows for ``kind``, input images at ``side`` (a quarter of it for super_resolution)."""
    inside = side // 4 if kind == "super_resolution" else side
    return manifest_rows(kind, n).drop_columns(["image", "mask"]).append_column(
        "image", pa.array([png(inside, i) for i in range(n)])).append_column("mask", pa.array([half_mask(inside)] * n))


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{k}" for m, k, *_ in CASES])
def ran(request, tiny_more, tmp_path_factory):
    model, kind, side, family, pipeline = request.param
    spec = spec_for(tiny_more(model), kind, side)
    stage = stage_class(kind)(spec, StorageSpec())
    table = prepared([spec], rows_at(kind, side), tmp_path_factory.mktemp("rows"))
    return {"kind": kind, "side": side, "family": family, "pipeline": pipeline, "together": stage(table),
            "alone": [stage(table.slice(i, 1)) for i in range(table.num_rows)]}


class TestGenericContract:
    def test_all_rows_ok_at_the_asked_size(self, ran):
        out, side = ran["together"], ran["side"]
        assert values(out, "status") == ["ok"] * 3, values(out, "error")
        assert [im.shape for im in raw_images(out)] == [(side, side, 3)] * 3
        assert len(set(pixels(out))) == 3

    def test_same_images_at_batch_size_1_and_3(self, ran):
        assert pixels(ran["together"]) == [pixels(out)[0] for out in ran["alone"]]

    def test_record_names_family_and_pipeline(self, ran):
        for (record,) in (json.loads(p) for p in values(ran["together"], columns.STAGE_PARAMS)):
            assert (record["kind"], record["family"], record["pipeline"]) == (ran["kind"], ran["family"],
                                                                              ran["pipeline"])
            assert (record["width"], record["height"]) == (ran["side"], ran["side"])


def test_if_cascade_reuses_stage_one_t5_embeddings(tiny_more, tmp_path):
    """IF stage I (16 px here) -> stage II (x4) -> the SD x4 upscaler, stage II on stage I's T5
    embeddings, the same images as from embeddings it computes itself."""
    flow = [spec_for(tiny_more("if-stage-1"), "text_to_image", 16),
            spec_for(tiny_more("if-stage-2"), "super_resolution", 64),
            spec_for("builtin:tiny-upscaler", "super_resolution", 256)]
    table = prepared(flow, manifest_rows("text_to_image", 2), tmp_path)
    first = stage_class("text_to_image")(flow[0], StorageSpec(), 0, keep_text_embeds=True)(table)
    second_stage = stage_class("super_resolution")(flow[1], StorageSpec(), 1)
    second = second_stage(first)
    third = stage_class("super_resolution")(flow[2], StorageSpec(), 2)(second)
    assert values(third, "status") == ["ok", "ok"], values(third, "error")
    assert [im.shape for im in raw_images(third)] == [(256, 256, 3)] * 2
    records = [json.loads(p) for p in values(third, columns.STAGE_PARAMS)]
    assert [[(r["family"], r["text_embeds"]) for r in rec] for rec in records] == \
        [[("if", "computed"), ("if-sr", "reused"), ("sd-x4-upscaler", "computed")]] * 2
    fresh = second_stage(first.drop_columns([columns.TEXT_ENCODER]).append_column(
        columns.TEXT_ENCODER, pa.nulls(first.num_rows, pa.string())))
    assert pixels(fresh) == pixels(second)


def test_shipped_safety_checker_is_not_run_and_recorded(tiny_more, tmp_path):
    """A checkpoint whose safety checker flags every image, `safety_checker: off` (the default): no
    row comes back black and `ok`; the checker is not loaded, and each record says it was not run."""
    spec = spec_for(tiny_more("sd-flag-everything"), "text_to_image", 32)
    stage = stage_class("text_to_image")(spec, StorageSpec())
    out = stage(prepared([spec], manifest_rows("text_to_image"), tmp_path))
    assert stage.pipe.safety_checker is None
    assert values(out, "status") == ["ok"] * 3, values(out, "error")
    assert all(np.asarray(im).max() > 0 for im in raw_images(out))
    assert [json.loads(p)[0]["safety_checker"] for p in values(out, columns.STAGE_PARAMS)] == ["not run"] * 3


@pytest.fixture(scope="module")
def flagged(tiny_more, tmp_path_factory):
    """`safety_checker: filter` on the checkpoint whose checker flags every image: the stage, its
    input rows, and its output."""
    spec = spec_for(tiny_more("sd-flag-everything"), "text_to_image", 32, safety_checker="filter")
    stage = stage_class("text_to_image")(spec, StorageSpec())
    table = prepared([spec], manifest_rows("text_to_image"), tmp_path_factory.mktemp("flagged"))
    return {"stage": stage, "table": table, "out": stage(table)}


def test_safety_checker_filter_makes_flagged_rows_filtered_without_an_image(flagged):
    out = flagged["out"]
    assert values(out, "status") == ["filtered"] * 3
    assert values(out, "error") == ["safety_checker: StableDiffusionSafetyChecker flagged the image as not safe "
                                    "for work"] * 3
    assert raw_images(out) == [None] * 3  # never a black image
    assert values(out, columns.STAGE_PARAMS) == ["[]"] * 3  # no stage made an image for them


def test_safety_checker_filter_passes_rows_it_does_not_flag(flagged):
    """The same checker with its concept thresholds above any cosine similarity flags nothing:
    every row ok, not black, recorded as passed."""
    import torch

    weights = flagged["stage"].pipe.safety_checker.concept_embeds_weights
    saved = weights.detach().clone()
    try:
        with torch.no_grad():
            weights.fill_(2.0)
        out = flagged["stage"](flagged["table"])
    finally:
        with torch.no_grad():
            weights.copy_(saved)
    assert values(out, "status") == ["ok"] * 3, values(out, "error")
    assert all(im.max() > 0 for im in raw_images(out))
    assert [json.loads(p)[0]["safety_checker"] for p in values(out, columns.STAGE_PARAMS)] == ["passed"] * 3


def test_flagged_rows_are_counted_filtered_in_stats_and_summary(flagged, tmp_path):
    """_stats.json, the run's summary and its progress line count the flagged rows as filtered (by
    reason), not as errors."""
    from datetime import datetime, timezone

    from pipeline import layout, progress, sink
    from pipeline.job import summary_line
    from pipeline.stats import Stats

    manifest = write_manifest(str(tmp_path / "m.parquet"), manifest_rows("text_to_image"))
    spec = parse_spec({"manifest": manifest, "output": str(tmp_path / "out"),
                       "stages": [{"kind": "text_to_image", "model": "builtin:tiny-sd"}]})
    out = flagged["out"]
    written = pa.table({"id": ["a", "b", "c", "d"], "status": ["ok", "error", *values(out, "status")[:2]],
                        "error": [None, "text_to_image: ValueError: bad", *values(out, "error")[:2]]})
    now = datetime.now(timezone.utc)
    stats = sink.finalize(spec, "run", [], [], written, now, now)
    assert (stats.rows, stats.ok, stats.error, stats.filtered) == (4, 1, 1, 2)
    assert stats.errors_by_kind == {"text_to_image": 1} and stats.filtered_by_reason == {"safety_checker": 2}
    on_disk = Stats.from_json((tmp_path / "out" / layout.STATS).read_text())
    assert (on_disk.filtered, on_disk.filtered_by_reason) == (2, {"safety_checker": 2})
    assert "4 rows (1 ok, 1 error, 2 filtered {'safety_checker': 2})" in summary_line(spec, stats)
    counts = {progress.DONE: 4, progress.OK: 1, progress.FILTERED: 2}
    assert progress.line(4, {}, counts, 2.0).startswith("shardgen: 4/4 rows (1 ok, 1 error, 2 filtered)")


def test_filters_leave_rows_the_safety_checker_filtered_as_they_are(tmp_path):
    """`filters:` decide over rows with an image; a row the safety checker filtered has none and
    keeps its status and reason (a rerun of the filters changes nothing either)."""
    import pyarrow.parquet as pq

    from pipeline.synth import filters

    (tmp_path / "out" / "data").mkdir(parents=True)
    shard = pa.table({"id": ["a", "b", "c"], "status": ["ok", "ok", "filtered"],
                      "error": [None, None, "safety_checker: flagged"], "image_sha256": ["s1", "s1", None],
                      "phash": ["0" * 16] * 2 + [None], "label_prob": pa.nulls(3, pa.float64()),
                      "filter_reason": pa.nulls(3, pa.string())})
    pq.write_table(shard, tmp_path / "out" / "data" / "part-1.parquet")
    spec = parse_spec({"manifest": str(tmp_path / "m.parquet"), "output": str(tmp_path / "out"),
                       "stages": [{"kind": "text_to_image", "model": "builtin:tiny-sd"}],
                       "filters": {"exact_duplicates": True}})
    report = filters.apply(spec, ["data/part-1.parquet"], log=lambda *_: None)
    assert report.written.column("status").to_pylist() == ["ok", "filtered", "filtered"]
    assert report.by_reason == {"exact_duplicate": 1} and report.candidates == 2
    assert report.written.column("error").to_pylist()[2] == "safety_checker: flagged"


def test_safety_checker_filter_is_refused_on_the_driver_without_a_checker(tiny_more, tmp_path):
    manifest = write_manifest(str(tmp_path / "m.parquet"), manifest_rows("text_to_image", 1))
    spec = parse_spec({"manifest": manifest, "output": str(tmp_path / "out"),
                       "stages": [{"kind": "text_to_image", "model": tiny_more("flux-kontext"), "width": 32,
                                   "height": 32, "safety_checker": "filter"}]})
    with pytest.raises(ModelError, match=r"^safety_checker: filter runs the safety checker a model ships, and .* "
                                         r"\(FluxKontextPipeline\) ships none; leave safety_checker off"):
        check_sources(spec)
    on_sd = spec.stages[0].model_copy(update={"model": tiny_more("sd-flag-everything")})
    assert check_family(on_sd.model, index_of(on_sd.model), on_sd).name == "sd"


def test_the_flag_everything_checker_does_flag(tiny_more):
    """The checker the test above relies on: loaded and run as diffusers would, it blackens all."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_more("sd-flag-everything"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red circle"] * 2, width=32, height=32, num_inference_steps=1, output_type="np")
    assert out.nsfw_content_detected == [True, True] and not out.images.any()


def index_of(folder: str) -> dict:
    from pathlib import Path

    return json.loads((Path(folder) / "model_index.json").read_text())


AUTO = [  # model_index classes outside FAMILIES: (class, kind, family, pipeline for the kind)
    ("QwenImagePipeline", "inpainting", "qwenimage", "QwenImageInpaintPipeline"),
    ("QwenImageEditPipeline", "image_to_image", "qwenimage-edit", "QwenImageEditPipeline"),
    ("Flux2KleinPipeline", "image_to_image", "flux2-klein", "Flux2KleinPipeline"),
    ("SanaPipeline", "text_to_image", "sana", "SanaPipeline"),
    ("LatentConsistencyModelPipeline", "image_to_image", "lcm", "LatentConsistencyModelImg2ImgPipeline"),
]


@pytest.mark.parametrize("cls, kind, family, pipeline", AUTO)
def test_mapping_gives_the_class_of_the_kind(cls, kind, family, pipeline):
    found = check_family("m", {"_class_name": cls}, StageSpec(kind=kind, model="m", width=64, height=64))
    assert (found.name, found.pipelines[kind]) == (family, pipeline)


@pytest.mark.parametrize("cls, kind, reason", [
    ("QwenImageEditPipeline", "text_to_image", "(it serves image_to_image, inpainting)"),
    ("CogView4ControlPipeline", "text_to_image", "needs a control image"),
    ("StableDiffusionControlNetPAGPipeline", "text_to_image", "needs a control image"),
    ("WanPipeline", "text_to_image", "(no family shardgen knows)"),
])
def test_outside_what_a_stage_can_run_is_refused(cls, kind, reason):
    with pytest.raises(ModelError) as err:
        check_family("m", {"_class_name": cls}, StageSpec(kind=kind, model="m"))
    assert cls in str(err.value) and reason in str(err.value)


def test_size_guard_multiple_and_native():
    sana = check_family("m", {"_class_name": "SanaPipeline"}, StageSpec(kind="text_to_image", model="m"))
    assert size_problem(sana, 1024, 1000) == ("height: 1000 is not a multiple of 32, which SANA needs (try 992 "
                                              "or 1024)")
    assert size_problem(sana, 1024, 768) is None and size_warning(sana, 1024, 768) is None
    assert "far from SANA's native 1024x1024" in size_warning(sana, 256, 1024)
    assert "far from" in size_warning(sana, 1024, 2560)


def test_size_guard_on_the_driver_names_the_field(tiny_more, tmp_path):
    model = tiny_more("flux-kontext")
    manifest = write_manifest(str(tmp_path / "m.parquet"), manifest_rows("text_to_image", 1))

    def spec(side):
        return parse_spec({"manifest": manifest, "output": str(tmp_path / "out"),
                           "flows": {"a": [{"kind": "text_to_image", "model": model, "width": 1024,
                                            "height": side}]}})

    with pytest.raises(ModelError, match=r"^flows\.a\.0\.height: 1000 is not a multiple of 16, which FLUX\.1 "
                                         r"Kontext needs \(try 992 or 1008\)") as err:
        check_sources(spec(1000))
    assert err.value.exit_code == 2
    (warning,) = check_sources(spec(256))
    assert warning.startswith("shardgen: warning: flows.a.0: 1024x256 is far from FLUX.1 Kontext's native")
    assert check_sources(spec(1024)) == []


def test_new_families_and_the_if_cascade_in_one_ray_job(tiny_more, tmp_path, ray_local):
    """One streaming job on real Ray, routed by `task`: the IF cascade (stage I -> stage II on
    stage I's T5 embeddings -> SD x4 upscaler), Qwen-Image and Stable Cascade text_to_image, and
    FLUX.1 Kontext editing a manifest image by an instruction."""
    def stage(model, kind, side, **kw):
        return {"kind": kind, "model": tiny_more(model) if model in REGISTRY else model, **FAST, "batch_size": 2,
                "width": side, "height": side, **kw}

    spec = parse_spec({
        "manifest": str(tmp_path / "m.parquet"), "output": str(tmp_path / "out"),
        "flows": {
            "if": [stage("if-stage-1", "text_to_image", 16), stage("if-stage-2", "super_resolution", 64),
                   stage("builtin:tiny-upscaler", "super_resolution", 256)],
            "qwen": [stage("qwen-image", "text_to_image", 32)],
            "cascade": [stage("stable-cascade", "text_to_image", 128)],
            "kontext": [stage("flux-kontext", "image_to_image", 32)],
        }})
    rows = [{"id": f"{task}-{i}", "task": task, "prompt": "make it a red circle" if task == "kontext" else
             f"a green square {i}", "image": png(32, i) if task == "kontext" else None}
            for task in spec.flows for i in range(2)]
    write_manifest(spec.manifest, rows)
    stats = run_job(spec)
    out = {r["id"]: r for r in read_output(spec.output).to_pylist()}
    assert (stats.rows, stats.ok) == (8, 8), [r["error"] for r in out.values()]
    expect = {"if": (256, ["if", "if-sr", "sd-x4-upscaler"], ["computed", "reused", "computed"]),
              "qwen": (32, ["qwenimage"], ["pipeline"]), "cascade": (128, ["cascade"], ["pipeline"]),
              "kontext": (32, ["flux-kontext"], ["pipeline"])}
    for task, (side, families, embeds) in expect.items():
        for i in range(2):
            row = out[f"{task}-{i}"]
            assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (side, side)
            records = json.loads(row["stage_params"])
            assert [(r["family"], r["text_embeds"]) for r in records] == list(zip(families, embeds))


def with_references(table: pa.Table, references: list) -> pa.Table:
    return table.append_column("reference_images", pa.array(references, pa.list_(pa.binary())))


def test_reference_images_go_to_models_that_take_several(tiny_more, tmp_path):
    """FLUX.2 [klein] edits a row's image with its reference_images after it: all rows ok at the
    image's size, and the references change the image; a model that takes one image makes an error
    row that says so; a reference that cannot be read is an error row naming its index."""
    spec = spec_for(tiny_more("flux2-klein"), "image_to_image", 64)
    stage = stage_class("image_to_image")(spec, StorageSpec())
    plain = prepared([spec], rows_at("image_to_image", 64, 2), tmp_path)
    table = with_references(rows_at("image_to_image", 64, 2), [[png(64, 7), png(80, 8)], None])
    out = stage(prepared([spec], table, tmp_path))
    assert values(out, "status") == ["ok", "ok"], values(out, "error")
    assert [im.shape for im in raw_images(out)] == [(64, 64, 3)] * 2
    alone = stage(plain)
    assert pixels(out)[0] != pixels(alone)[0] and pixels(out)[1] == pixels(alone)[1]

    kontext = spec_for(tiny_more("flux-kontext"), "image_to_image", 64)
    out = stage_class("image_to_image")(kontext, StorageSpec())(prepared([kontext], table, tmp_path))
    assert values(out, "status") == ["error", "ok"]
    assert "reference_images: FluxKontextPipeline (FLUX.1 Kontext) takes one image" in values(out, "error")[0]

    bad = prepared([spec], with_references(rows_at("image_to_image", 64, 1), [[png(64, 1), b"not an image"]]),
                   tmp_path)
    assert values(bad, "error") == ["reference_images[1]: not a readable image (UnidentifiedImageError: no known "
                                    "image format)"]


def test_int8_weight_only_quantization_runs_on_cpu(tiny_more, tmp_path):
    spec = spec_for(tiny_more("flux-kontext"), "text_to_image", 32, quantize="int8_weight_only")
    stage = stage_class("text_to_image")(spec, StorageSpec())
    out = stage(prepared([spec], manifest_rows("text_to_image", 2), tmp_path))
    assert values(out, "status") == ["ok", "ok"], values(out, "error")
    assert [json.loads(p)[0]["quantize"] for p in values(out, columns.STAGE_PARAMS)] == ["int8_weight_only"] * 2
    weight = stage.pipe.transformer.x_embedder.weight
    assert "Int8" in type(weight).__name__, type(weight)


def test_gpu_only_settings_are_refused_where_they_cannot_run(tiny_more):
    with pytest.raises(ModelError, match="^quantize: nf4 runs on GPUs only"):
        stage_class("text_to_image")(spec_for(tiny_more("flux-kontext"), "text_to_image", 32, quantize="nf4"),
                                     StorageSpec())
    with pytest.raises(ValueError, match="gpus_per_actor: 2.5 is over 1 and not a whole number"):
        StageSpec(kind="text_to_image", model="m", gpus_per_actor=2.5)
    with pytest.raises(ValueError, match="offload: group and gpus_per_actor 2 both place the weights"):
        StageSpec(kind="text_to_image", model="m", gpus_per_actor=2, offload="group")
    with pytest.raises(ValueError, match="less than or equal to 8"):
        StageSpec(kind="text_to_image", model="m", gpus_per_actor=9)
    assert StageSpec(kind="text_to_image", model="m", gpus_per_actor=4, quantize="fp8_weight_only").gpus_per_actor == 4
