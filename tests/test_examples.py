"""Every example under examples/ runs as its comments say: `shardgen manifest from` its source
file, then `shardgen run` on the spec (here on two rows and two steps, to stay fast: the cascade
through Ray, the others as the job's steps in this process). The
conditioning examples (examples/conditioning/, examples/segmentation/) are checked as `validate`
checks them, less its look at the cluster: the manifest, the models and adapters on the driver, and
the prepare step on every row (each control and reference image read, Canny computed), since
tests/test_conditioning.py runs the same stages in process."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline import job, validate
from pipeline.job import load_spec, run_job
from pipeline.manifest_from import manifest_from
from pipeline.models.resolve import check_sources
from pipeline.spec import parse_spec
from tests.helpers import read_output, run_in_process

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SPECS = sorted(EXAMPLES.glob("*.yaml"))
CONDITIONING = sorted(EXAMPLES.glob("conditioning/*.yaml"))
# The cascade runs as a Ray job (its two stages, two actor pools); the other examples' steps run
# in this process (tests.helpers.run_in_process): what they check is their spec, manifest and
# models, and each Ray job would start a stage actor importing diffusers again.
THROUGH_RAY = "cascade"


def test_there_are_examples():
    assert {p.name for p in SPECS} >= {"text_to_image.yaml", "cascade.yaml", "captions.yaml"}


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_example_runs(path, tmp_path, ray_local):
    spec = load_spec(str(path))
    manifest = Path(spec.manifest)
    assert manifest.parent.name == "examples" and manifest.suffix == ".parquet", spec.manifest
    source = next(p for p in EXAMPLES.glob(manifest.stem + ".*") if p.suffix not in (".yaml", ".parquet"))
    assert f"shardgen manifest from examples/{source.name}" in path.read_text()
    converted = manifest_from(str(source), str(tmp_path / "full.parquet"), log=lambda _: None)
    pq.write_table(pq.read_table(converted).slice(0, 2), tmp_path / "m.parquet")
    small = spec.model_copy(update={"manifest": str(tmp_path / "m.parquet"), "output": str(tmp_path / "out")})
    for stage in small.all_stages():
        stage.steps = 2
    if path.stem == THROUGH_RAY:
        stats = run_job(small, log=lambda _: None)
        assert (stats.rows, stats.ok) == (2, 2)
        out = read_output(str(tmp_path / "out")).to_pylist()
    else:
        out = run_in_process(small).to_pylist()
        assert [r["status"] for r in out] == ["ok", "ok"], out
    source = pq.read_table(converted).to_pylist()[:2]
    for row, given in zip(sorted(out, key=lambda r: r["id"]), sorted(source, key=lambda r: r["id"])):
        image = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])))
        assert image.std() > 0 and row["model"].startswith("builtin:shapes-")
        if "width" in given and not small.overrides:  # a caption set's photo sizes: kept, not generated at
            stage = small.all_stages()[0]
            assert (row["width"], row["height"]) == (stage.width, stage.height) == image.shape[1::-1]
            assert (row["source_width"], row["source_height"]) == (given["width"], given["height"])


def test_there_are_conditioning_examples():
    assert {p.stem for p in CONDITIONING} >= {"controlnet", "canny", "t2i_adapter", "ip_adapter"}


def _validated(spec_path: Path, manifest: str, tmp_path) -> int:
    """`validate`'s checks of the example's spec on ``manifest`` (from the repository root, which
    the example's paths are relative to; the output in ``tmp_path``): the rows the prepare step
    made without an error, after asserting that none failed."""
    data = yaml.safe_load(spec_path.read_text())
    spec = parse_spec({**data, "manifest": manifest, "output": str(tmp_path / "out")})
    job.check(spec)
    check_sources(spec, build=False)
    tried, kinds, examples = validate._sample(spec)
    assert not kinds, examples
    return tried


@pytest.mark.parametrize("path", CONDITIONING, ids=[p.stem for p in CONDITIONING])
def test_conditioning_example_validates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)
    source = path.with_suffix(".csv")
    assert f"shardgen manifest from examples/conditioning/{source.name}" in path.read_text()
    # The images beside the manifest, as beside the source: its relative paths resolve against its folder.
    shutil.copytree(EXAMPLES / "conditioning" / "images", tmp_path / "images")
    manifest = manifest_from(str(source), str(tmp_path / "m.parquet"), log=lambda _: None)
    assert _validated(path, manifest, tmp_path) == 4


def test_the_segmentation_example_validates(tmp_path, monkeypatch):
    from pipeline.cli import main as cli

    monkeypatch.chdir(EXAMPLES.parent)
    spec = EXAMPLES / "segmentation" / "spec.yaml"
    assert "shardgen manifest synth --control-maps examples/segmentation/maps" in spec.read_text()
    manifest = str(tmp_path / "manifest.parquet")
    assert cli(["manifest", "synth", "--control-maps", "examples/segmentation/maps", "--classes",
                "examples/segmentation/classes.yaml", "--templates", "examples/segmentation/templates.yaml",
                "--splits", "train=1", "--output", manifest]) == 0
    assert _validated(spec, manifest, tmp_path) == 8
