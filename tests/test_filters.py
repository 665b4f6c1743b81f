"""Filters mark rows `status: filtered` with a reason and never drop them; counts add up; the
decisions are global (after every shard is written) and a rerun changes nothing."""

import json
import shutil
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest

from pipeline import card, layout
from pipeline.errors import SpecError
from pipeline.job import run_job
from pipeline.spec import FiltersSpec, parse_spec
from pipeline.synth import filters
from tests.helpers import read_output, write_manifest

STAGE = {"kind": "text_to_image", "model": "builtin:shapes-t2i", "steps": 4, "width": 32, "height": 32, "batch_size": 4}


def _rows():
    # dup-a and dup-b: the same prompt and seed, so the same image; the others differ.
    rows = [{"id": "dup-a", "prompt": "a red circle on a white background", "seed": 11, "label_name": "circle"},
            {"id": "dup-b", "prompt": "a red circle on a white background", "seed": 11, "label_name": "circle"}]
    prompts = ["a blue square on a black background", "a green triangle on a white background",
               "a yellow cross on a blue background", "a white diamond on a red background"]
    rows += [{"id": f"row-{i}", "prompt": p, "seed": 100 + i, "label_name": p.split()[2]}
             for i, p in enumerate(prompts)]
    return rows


@pytest.fixture(scope="module")
def filtered_job(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("filters")
    manifest = write_manifest(str(root / "m.parquet"), _rows())
    spec = parse_spec({"manifest": manifest, "output": str(root / "out"), "stages": [STAGE],
                       "format": {"rows_per_shard": 2},
                       "filters": {"exact_duplicates": True, "confidence": {"threshold": 0.0}}})
    return spec, run_job(spec)


def _by_id(spec):
    return {r["id"]: r for r in read_output(spec.output).to_pylist()}


def test_exact_duplicate_marked_with_reason_and_kept_in_output(filtered_job):
    spec, stats = filtered_job
    rows = _by_id(spec)
    assert len(rows) == 6  # nothing dropped
    assert rows["dup-a"]["image_sha256"] == rows["dup-b"]["image_sha256"]
    assert rows["dup-a"]["status"] == "ok" and rows["dup-a"]["filter_reason"] is None
    assert rows["dup-b"]["status"] == "filtered"
    assert rows["dup-b"]["filter_reason"] == "exact_duplicate: the same image as dup-a"
    assert rows["dup-b"]["image"]["bytes"]  # a filtered row keeps its image
    assert all(len(r["phash"]) == 16 and 0 <= r["label_prob"] <= 1 for r in rows.values())


def test_stats_add_up(filtered_job):
    spec, stats = filtered_job
    saved = json.loads(Path(spec.output, layout.STATS).read_text())
    assert stats.rows == stats.ok + stats.filtered + stats.error == 6
    assert stats.filtered == saved["filtered"] == 1 and stats.error == 0
    assert saved["filtered_by_reason"] == {"exact_duplicate": 1}
    assert saved["filter_pass_rate"] == round(5 / 6, 4) and saved["duplicate_rate"] == round(1 / 6, 4)
    assert saved["per_class"]["circle"] == {"ok": 1, "filtered": 1, "error": 0}
    assert sum(c["ok"] for c in saved["per_class"].values()) == 5


def _files(output) -> list[str]:
    return sorted(p.relative_to(output).as_posix() for p in Path(output, layout.DATA).rglob("*.parquet"))


def test_load_dataset_gives_the_ok_rows_and_all_rows_on_request(filtered_job, tmp_path):
    spec, _ = filtered_job
    ok = datasets.load_dataset(spec.output, split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(ok["id"]) == sorted(set(_by_id(spec)) - {"dup-b"})
    assert set(ok["status"]) == {"ok"}
    every = datasets.load_dataset(spec.output, card.ALL_ROWS, split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(every["id"]) == sorted(_by_id(spec)) and every[every["id"].index("dup-b")]["status"] == "filtered"


def test_only_the_configured_filters_run():
    # dup-b repeats dup-a's image, but only the confidence filter was asked for.
    spec = FiltersSpec.model_validate({"confidence": {"threshold": 0.5}})
    reasons = filters.decide(["dup-a", "dup-b"], [True, True], ["s1", "s1"], ["00", "00"], [0.9, 0.9], spec, 3)
    assert reasons == [None, None]


def test_rerun_changes_nothing(filtered_job):
    spec, _ = filtered_job
    files = _files(spec.output)
    report = filters.apply(spec, files, log=lambda *_: None)
    assert report.rewritten == [] and report.by_reason == {"exact_duplicate": 1}


def test_near_duplicates_and_confidence_rewrite_only_changed_shards(filtered_job, tmp_path):
    spec, _ = filtered_job
    out = tmp_path / "copy"
    shutil.copytree(spec.output, out)
    files = _files(out)
    near = spec.model_copy(update={"output": str(out), "filters": FiltersSpec(exact_duplicates=False,
                                                                                near_duplicate_distance=0)})
    report = filters.apply(near, files, log=lambda *_: None)
    rows = _by_id(near)
    assert rows["dup-b"]["filter_reason"] == "near_duplicate: phash 0 bit(s) from dup-a"
    # Only the shard holding dup-b changed (its reason), so only it was rewritten.
    assert len(report.rewritten) == 1
    assert "dup-b" in pq.read_table(out / report.rewritten[0], columns=["id"]).column("id").to_pylist()
    strict = near.model_copy(update={"filters": FiltersSpec.model_validate({"confidence": {"threshold": 1.0}})})
    report = filters.apply(strict, files, log=lambda *_: None)
    rows = _by_id(strict)
    assert report.by_reason == {"low_confidence": 6} and len(report.rewritten) == len(files)
    assert all(r["status"] == "filtered" and r["filter_reason"].startswith("low_confidence: p=") for r in rows.values())


def test_decide_orders_by_id_and_applies_each_filter_once():
    spec = FiltersSpec.model_validate({"exact_duplicates": True, "near_duplicate_distance": 1,
                                       "confidence": {"threshold": 0.5}})
    ids = ["d", "a", "c", "b", "e"]
    reasons = filters.decide(ids, [True, True, True, True, False], sha=["s1", "s1", "s2", "s3", None],
                             phash=["00", "00", "ff", "fe", None], prob=[0.9, 0.9, 0.9, 0.4, None], filters=spec)
    assert reasons == ["exact_duplicate: the same image as a", None, None,
                       "low_confidence: p=0.400 <= 0.500", None]
    reasons = filters.decide(["x", "y"], [True, True], ["s1", "s2"], ["f0", "f1"], [None, None],
                             FiltersSpec(near_duplicate_distance=1))
    assert reasons == [None, "near_duplicate: phash 1 bit(s) from x"]


def test_confidence_filter_refuses_unknown_classes(tmp_path):
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"id": "a", "prompt": "a red star", "label_name": "star"}])
    spec = parse_spec({"manifest": manifest, "output": str(tmp_path / "out"), "stages": [STAGE],
                       "filters": {"confidence": {}}})
    with pytest.raises(SpecError, match=r"does not know the class\(es\) \['star'\]"):
        run_job(spec)
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_default_threshold_counts_the_jobs_classes():
    # A job of 3 shapes judged by the 5-class shape classifier: chance is 1/3, not 1/5.
    conf = FiltersSpec.model_validate({"confidence": {}})
    assert filters.threshold(conf.confidence, 3) == pytest.approx(1 / 3)
    reasons = filters.decide(["a", "b"], [True, True], ["s1", "s2"], ["00", "ff"], [0.3, 0.4], conf, 3)
    assert reasons == ["low_confidence: p=0.300 <= 0.333", None]
