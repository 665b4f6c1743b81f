"""`format.image: webp | jpeg` with `quality`: each job's images decode, in the format asked for,
under a file name with its extension; quality changes the bytes (and lossy images stay close to
the PNG's pixels, the closer the higher the quality); WebP at quality 100 is lossless."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.job import run_job
from pipeline.spec import parse_spec
from tests.conftest import prompts_manifest, read_output, write_manifest

# (format, quality): PNG gives the generated pixels themselves, which every other case is compared with.
CASES = [("png", 95), ("webp", 100), ("webp", 30), ("jpeg", 30), ("jpeg", 90)]
PIL_NAME = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}
EXTENSION = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, ray_local):
    """{(format, quality): {id: row}} for one small manifest written in each case."""
    folder = tmp_path_factory.mktemp("formats")
    manifest = write_manifest(str(folder / "m.parquet"), prompts_manifest(3))
    results = {}
    for image, quality in CASES:
        output = str(folder / f"{image}-{quality}")
        spec = parse_spec({
            "manifest": manifest, "output": output, "format": {"image": image, "quality": quality},
            "stages": [{"kind": "text_to_image", "model": "builtin:tiny-sd", "steps": 2, "width": 32, "height": 32,
                        "batch_size": 4, "cpus_per_actor": 0.5}],
        })
        stats = run_job(spec, log=lambda _: None)
        assert (stats.rows, stats.ok) == (3, 3)
        results[(image, quality)] = {r["id"]: r for r in read_output(output).to_pylist()}
    return results


def pixels(row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("image, quality", CASES)
def test_images_decode_in_the_format_asked(outputs, image, quality):
    for row_id, row in outputs[(image, quality)].items():
        data = row["image"]["bytes"]
        decoded = Image.open(io.BytesIO(data))
        assert (decoded.format, decoded.size) == (PIL_NAME[image], (32, 32)), row_id
        assert row["image"]["path"] == row_id + EXTENSION[image]
        assert row["image_sha256"] == hashlib.sha256(data).hexdigest()


def test_webp_at_quality_100_is_lossless(outputs):
    png, webp = outputs[("png", 95)], outputs[("webp", 100)]
    for row_id in png:
        assert np.array_equal(pixels(webp[row_id]), pixels(png[row_id])), row_id


@pytest.mark.parametrize("image, low, high", [("webp", 30, 100), ("jpeg", 30, 90)])
def test_quality_changes_the_bytes(outputs, image, low, high):
    reference = outputs[("png", 95)]
    for row_id in reference:
        a, b = outputs[(image, low)][row_id], outputs[(image, high)][row_id]
        assert a["image"]["bytes"] != b["image"]["bytes"], row_id
        assert a["image_sha256"] != b["image_sha256"]
        # The higher quality is the closer to the lossless pixels; both are the same picture.
        error_low = np.abs(pixels(a) - pixels(reference[row_id])).mean()
        error_high = np.abs(pixels(b) - pixels(reference[row_id])).mean()
        assert error_high <= error_low, (row_id, error_low, error_high)
        assert error_low < 40, (row_id, error_low)  # of 255: a lossy copy, not another image
