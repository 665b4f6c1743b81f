"""`format.image: webp | jpeg` with `quality`: each job's images decode, in the format asked for,
under a file name with its extension, and are the generated pixels encoded at the quality asked
for (another quality gives other bytes); WebP at quality 100 is lossless."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.encode import encode_image
from pipeline.job import run_job
from pipeline.spec import FormatSpec, parse_spec
from tests.helpers import prompts_manifest, read_output, run_in_process, write_manifest

# PNG gives the generated pixels themselves, which the lossy cases are compared with.
CASES = [("png", 95), ("webp", 30), ("jpeg", 30)]
PIL_NAME = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}
EXTENSION = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}
JOB_CASE = "jpeg"  # its bytes, the PNG case's pixels encoded, also show that a job makes those pixels


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, ray_local):
    """{(format, quality): {id: row}} for one small manifest: the JPEG case written by a job, the
    others by the job's own steps in this process (what differs between them is the encoder)."""
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
        if image == JOB_CASE:
            stats = run_job(spec, log=lambda _: None)
            assert (stats.rows, stats.ok) == (3, 3)
            rows = read_output(output).to_pylist()
        else:
            rows = run_in_process(spec).to_pylist()
        results[(image, quality)] = {r["id"]: r for r in rows}
    return results


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("image, quality", CASES)
def test_images_decode_in_the_format_asked(outputs, image, quality):
    for row_id, row in outputs[(image, quality)].items():
        data = row["image"]["bytes"]
        decoded = Image.open(io.BytesIO(data))
        assert (decoded.format, decoded.size) == (PIL_NAME[image], (32, 32)), row_id
        assert row["image"]["path"] == row_id + EXTENSION[image]
        assert row["image_sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("image", ["webp", "jpeg"])
def test_images_are_encoded_at_the_quality_asked(outputs, image):
    for row_id, row in outputs[(image, 30)].items():
        generated = pixels(outputs[("png", 95)][row_id]["image"]["bytes"])
        data = row["image"]["bytes"]
        assert data == encode_image(generated, FormatSpec(image=image, quality=30)), row_id
        assert data != encode_image(generated, FormatSpec(image=image, quality=90)), row_id
        # A lossy copy of the same picture, not another image.
        assert np.abs(pixels(data).astype(np.int16) - generated).mean() < 40, row_id


def test_webp_at_quality_100_is_lossless(outputs):
    for row in outputs[("png", 95)].values():
        generated = pixels(row["image"]["bytes"])
        assert np.array_equal(pixels(encode_image(generated, FormatSpec(image="webp", quality=100))), generated)
