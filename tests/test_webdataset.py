"""A synthetic-data output (the session's `synth_output`, made once for this module): its card
declares the labels a ClassLabel and the splits; `shardgen export webdataset` makes tar shards
{split}-%06d.tar with key.png / key.cls / key.json, read back by the `webdataset` package and by
`datasets`; published whole, resumable."""

import io
import json
from datetime import datetime

import datasets
import pyarrow as pa
import pytest
import webdataset as wds
from PIL import Image

from pipeline.card import webdataset_card
from pipeline.cli import main as cli_main
from pipeline.export import export_webdataset
from pipeline.writers.webdataset import WebDatasetWriter, sample_key, sample_schema
from tests.conftest import SYNTH_CLASSES
from tests.helpers import read_output


@pytest.fixture(scope="module")
def exported(synth_output, tmp_path_factory):
    output, _, _ = synth_output
    dest = tmp_path_factory.mktemp("wds")
    summary = export_webdataset(str(output), str(dest), rows_per_shard=2, include_filtered=True, log=lambda *_: None)
    return output, dest, summary


def test_card_declares_class_label_and_splits(synth_output, tmp_path):
    output, manifest, _ = synth_output
    card = (output / "README.md").read_text()
    assert "class_label" in card and "machine-generated" in card and "builtin:shapes-t2i" in card
    ds = datasets.load_dataset(str(output), cache_dir=str(tmp_path / "hf"))
    assert set(ds) == {"train", "validation", "test"}
    # The default config is the ok rows; "all" adds the filtered ones (every row of each split).
    assert {split: len(ds[split]) for split in ds} == {"train": 4, "validation": 3, "test": 2}
    every = datasets.load_dataset(str(output), "all", cache_dir=str(tmp_path / "hf"))
    assert {split: len(every[split]) for split in every} == {"train": 6, "validation": 3, "test": 3}
    feature = ds["train"].features["label"]
    assert isinstance(feature, datasets.ClassLabel) and feature.names == SYNTH_CLASSES
    row = ds["test"][0]
    assert feature.int2str(row["label"]) == row["label_name"] and row["split"] == "test"


def test_shards_per_split(exported):
    _, dest, summary = exported
    assert summary == {"train": {"shards": 3, "samples": 6}, "test": {"shards": 2, "samples": 3},
                       "validation": {"shards": 2, "samples": 3}}
    assert sorted(p.name for p in dest.glob("*.tar")) == [
        "test-000000.tar", "test-000001.tar", "train-000000.tar", "train-000001.tar", "train-000002.tar",
        "validation-000000.tar", "validation-000001.tar"]


def test_webdataset_package_reads_samples(exported):
    output, dest, _ = exported
    rows = {r["id"]: r for r in read_output(str(output)).to_pylist()}
    samples = list(wds.WebDataset(str(dest / "train-{000000..000002}.tar"), shardshuffle=False).decode("pil"))
    assert len(samples) == 6
    for sample in samples:
        meta = sample["json"]
        row = rows[meta["id"]]
        assert sample["__key__"] == sample_key(row["id"])
        assert sample["png"].size == (32, 32)
        assert sample["cls"] == row["label"] and SYNTH_CLASSES[sample["cls"]] == meta["label_name"]
        assert meta["split"] == "train" and meta["prompt"] == row["prompt"] and meta["seed"] == row["seed"]


def test_datasets_loads_the_tars(exported, tmp_path):
    _, dest, _ = exported
    ds = datasets.load_dataset(str(dest), split="test", cache_dir=str(tmp_path / "hf"))  # by the card
    assert len(ds) == 3
    assert isinstance(ds.features["png"], datasets.Image) and ds[0]["png"].size == (32, 32)
    assert ds[0]["cls"] in range(len(SYNTH_CLASSES)) and ds[0]["json"]["split"] == "test"


def test_ok_rows_only_by_default(synth_output, tmp_path):
    output, _, stats = synth_output
    summary = export_webdataset(str(output), str(tmp_path / "ok"), rows_per_shard=100, log=lambda *_: None)
    assert sum(s["samples"] for s in summary.values()) == stats.ok


def test_rerun_writes_only_missing_tars_and_same_bytes(exported, tmp_path):
    output, dest, _ = exported
    before = (dest / "train-000001.tar").read_bytes()
    (dest / "train-000001.tar").unlink()
    written = []
    export_webdataset(str(output), str(dest), rows_per_shard=2, include_filtered=True, log=written.append)
    assert written == ["shardgen: train-000001.tar: 2 samples"]
    assert (dest / "train-000001.tar").read_bytes() == before
    assert json.loads((dest / "_webdataset.json").read_text())["splits"]["train"]["samples"] == 6


def test_refuses_other_options_and_unfinished_outputs(exported, tmp_path):
    output, dest, _ = exported
    assert cli_main(["export", "webdataset", str(output), str(dest), "--rows-per-shard", "3"]) == 2
    assert cli_main(["export", "webdataset", str(tmp_path), str(tmp_path / "d")]) == 2


def test_sample_keys_have_no_dots():
    assert sample_key("row-001") == "row-001"
    assert sample_key("a.b/c").startswith("a_b_c_") and sample_key("a.b/c") != sample_key("a_b_c")


def _rows(ids: list[str], errors: list[str | None]) -> pa.Table:
    png = (Image.new("RGB", (8, 8), "red"), io.BytesIO())
    png[0].save(png[1], format="PNG")
    return pa.table({"id": ids, "image": [{"bytes": png[1].getvalue(), "path": None}] * len(ids),
                     "status": ["filtered" if e else "ok" for e in errors], "error": errors,
                     "created_at": pa.array([datetime(2026, 1, 1)] * len(ids), pa.timestamp("us"))})


def test_card_types_a_field_that_is_null_in_every_sample_of_the_first_tar(tmp_path):
    """`datasets` alone types a JSON field from the first tar's first samples; null in all of
    them made it a null field, and the first string in a later tar failed the load."""
    first, later = _rows(["a", "b"], [None, None]), _rows(["c"], ["nsfw"])
    for name, table in (("train-000000.tar", first), ("train-000001.tar", later)):
        (tmp_path / name).write_bytes(WebDatasetWriter().encode(table))
    (tmp_path / "README.md").write_text(webdataset_card(sample_schema(first), {"train": "train-*.tar"}))
    ds = datasets.load_dataset(str(tmp_path), split="train", cache_dir=str(tmp_path / "hf"))
    assert [r["json"]["error"] for r in ds] == [None, None, "nsfw"]
    assert ds.features["json"]["error"] == datasets.Value("string")
    assert ds[0]["json"]["created_at"] == "2026-01-01 00:00:00" and ds[0]["png"].size == (8, 8)
