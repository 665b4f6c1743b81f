"""What stage parameters do to the images, in one job run through `shardgen run`:

- per-row overrides (steps, guidance_scale, width, height) apply to the first stage of a cascade
  only; the super-resolution stage after it keeps its spec values;
- image_to_image's `strength` (a per-row override) changes the image, while the same value on the
  same input, prompt and seed gives the same image;
- super_resolution's `noise_level` (a spec value) does the same, checked on the stage in process,
  as a Ray actor runs it (two more actor pools in the job would cost a minute of CPU here).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image

from pipeline import columns
from pipeline.cli import main
from pipeline.spec import StageSpec, StorageSpec
from pipeline.stages import stage_class
from pipeline.tables import raw_images, values
from tests.helpers import read_output, write_manifest
from tests.test_families import prepared
from tests.test_stages import png

STAGE = {"steps": 3, "cpus_per_actor": 0.25}
PROMPT = "a green square on a white background"


@pytest.fixture(scope="module")
def rows(tmp_path_factory, ray_local):
    folder = tmp_path_factory.mktemp("stage-behaviour")
    picture = png(32, 22)
    schema = pa.schema([("id", pa.string()), ("task", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()),
                        ("image", pa.binary()), ("steps", pa.int64()), ("guidance_scale", pa.float64()),
                        ("width", pa.int64()), ("height", pa.int64()), ("strength", pa.float64())])
    records = [
        {"id": "cascade-spec", "task": "cascade"},
        {"id": "cascade-row", "task": "cascade", "steps": 2, "guidance_scale": 3.0, "width": 16, "height": 24},
        {"id": "i2i-0.3", "task": "i2i", "image": picture, "strength": 0.3},
        {"id": "i2i-0.3-again", "task": "i2i", "image": picture, "strength": 0.3},
        {"id": "i2i-0.9", "task": "i2i", "image": picture, "strength": 0.9},
    ]
    manifest = write_manifest(str(folder / "m.parquet"), pa.Table.from_pylist(
        [{"prompt": PROMPT, "seed": 5, **r} for r in records], schema=schema))
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "manifest": manifest, "output": str(folder / "out"),
        "overrides": ["steps", "guidance_scale", "width", "height", "strength"],
        "flows": {
            "cascade": [{"kind": "text_to_image", "model": "builtin:tiny-sd", "width": 32, "height": 32,
                         "guidance_scale": 7.5, **STAGE},
                        {"kind": "super_resolution", "model": "builtin:tiny-upscaler", "guidance_scale": 6.0,
                         **STAGE}],
            "i2i": [{"kind": "image_to_image", "model": "builtin:tiny-sd", **STAGE, "steps": 10}],
        },
    }))
    assert main(["run", "--spec", str(spec)]) == 0
    out = {r["id"]: r for r in read_output(str(folder / "out")).to_pylist()}
    assert sorted(out) == sorted(r["id"] for r in records)
    return out


def size(row: dict) -> tuple[int, int]:
    return Image.open(io.BytesIO(row["image"]["bytes"])).size


def pixels(row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"), dtype=np.int16)


def test_row_overrides_apply_to_the_first_stage_only(rows):
    spec_row, override_row = rows["cascade-spec"], rows["cascade-row"]
    first, second = json.loads(override_row["stage_params"])
    assert (first["kind"], first["steps"], first["guidance_scale"], first["width"], first["height"]) == (
        "text_to_image", 2, 3.0, 16, 24)
    # The upscaler keeps its own steps and guidance, and takes the first stage's 16x24 image.
    assert (second["kind"], second["steps"], second["guidance_scale"], second["width"], second["height"]) == (
        "super_resolution", 3, 6.0, 64, 96)
    assert size(override_row) == (64, 96)
    first, second = json.loads(spec_row["stage_params"])
    assert (first["steps"], first["guidance_scale"], first["width"], first["height"]) == (3, 7.5, 32, 32)
    assert (second["steps"], second["guidance_scale"], second["width"], second["height"]) == (3, 6.0, 128, 128)
    assert size(spec_row) == (128, 128)


def test_strength_changes_the_image(rows):
    assert [json.loads(rows[i]["stage_params"])[0]["strength"] for i in ("i2i-0.3", "i2i-0.9")] == [0.3, 0.9]
    assert rows["i2i-0.3"]["image_sha256"] == rows["i2i-0.3-again"]["image_sha256"]
    assert rows["i2i-0.3"]["image_sha256"] != rows["i2i-0.9"]["image_sha256"]
    assert np.abs(pixels(rows["i2i-0.3"]) - pixels(rows["i2i-0.9"])).max() > 0


def test_noise_level_changes_the_image(tmp_path):
    def upscaled(noise_level: int) -> list[np.ndarray]:
        spec = StageSpec(kind="super_resolution", model="builtin:tiny-upscaler", noise_level=noise_level, **STAGE)
        rows = pa.Table.from_pylist([{"id": f"r{i}", "prompt": PROMPT, "seed": 5, "image": png(16, 21)}
                                     for i in range(2)])
        out = stage_class("super_resolution")(spec, StorageSpec())(prepared([spec], rows, tmp_path))
        assert values(out, "status") == ["ok", "ok"], values(out, "error")
        assert json.loads(values(out, columns.STAGE_PARAMS)[0])[0]["noise_level"] == noise_level
        return raw_images(out)

    quiet, again = upscaled(0)
    noisy = upscaled(300)[0]
    assert quiet.shape == noisy.shape == (64, 64, 3)
    assert np.array_equal(quiet, again)  # same input, prompt and seed: the same image
    assert np.abs(quiet.astype(np.int16) - noisy).max() > 0
