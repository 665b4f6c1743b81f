"""Every example under examples/ runs as its comments say: `shardgen manifest from` its source
file, then `shardgen run` on the spec (here on two rows and two steps, to stay fast)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.job import load_spec, run_job
from pipeline.manifest_from import manifest_from
from tests.conftest import read_output

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SPECS = sorted(EXAMPLES.glob("*.yaml"))


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
    stats = run_job(small, log=lambda _: None)
    assert (stats.rows, stats.ok) == (2, 2)
    source = pq.read_table(converted).to_pylist()[:2]
    for row, given in zip(sorted(read_output(str(tmp_path / "out")).to_pylist(), key=lambda r: r["id"]),
                          sorted(source, key=lambda r: r["id"])):
        image = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])))
        assert image.std() > 0 and row["model"].startswith("builtin:shapes-")
        if "width" in given and not small.overrides:  # a caption set's photo sizes: kept, not generated at
            stage = small.all_stages()[0]
            assert (row["width"], row["height"]) == (stage.width, stage.height) == image.shape[1::-1]
            assert (row["source_width"], row["source_height"]) == (given["width"], given["height"])
