"""Every stage on real Ray with the built-in models, in one mixed job routed by `task`:
super-resolution, inpainting (9- and 4-channel), image-to-image, the text_to_image ->
super_resolution cascade, image inputs as bytes, structs and s3:// URIs, and bad inputs."""

from __future__ import annotations

import io
import json

import boto3
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import storage
from pipeline.job import run_job
from pipeline.spec import parse_spec
from tests.helpers import half_mask, png, read_output, run_in_process, write_manifest


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


FAST = {"steps": 3, "cpus_per_actor": 0.25}
MIXED_OUTPUT = "s3://mixed/out"


def mixed_spec(manifest: str):
    # Batches of 3: bad rows share batches with good ones.
    stage = lambda kind, **kw: {"kind": kind, **FAST, "batch_size": 3, **kw}  # noqa: E731
    return parse_spec({
        "manifest": manifest,
        "output": MIXED_OUTPUT,
        "flows": {
            # The random-weight built-ins, named: their shared text encoder is what the cascade test checks.
            "cascade": [stage("text_to_image", width=32, height=32, model="builtin:tiny-sd"),
                        stage("super_resolution", noise_level=30, model="builtin:tiny-upscaler")],
            "sr": [stage("super_resolution")],
            "inpaint": [stage("inpainting")],
            "inpaint_plain": [stage("inpainting", model="builtin:tiny-sd")],  # a 4-channel UNet
            "img2img": [stage("image_to_image", strength=0.6)],
        },
    })


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, s3_endpoint, ray_local):
    """The mixed job, in batches of 3 (bad rows share batches with good ones): {"out": {id: row},
    "inputs": {id: manifest row}}. Equal images at any batch size are each stage's contract
    (test_families.py) and, through Ray, test_determinism.py's."""
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="mixed")
    storage.write_bytes("s3://mixed/inputs/low.png", png(16, 3))
    struct = lambda data=None, path=None: {"bytes": data, "path": path}  # noqa: E731
    rows = [
        ("c1", "cascade", "a red circle on a blue background", None, None),
        ("c2", "cascade", "a green square on a white background", None, None),
        ("s1", "sr", "", struct(png(16, 1)), None),
        ("s2", "sr", "a sharp photo", struct(png(16, 2), "low-2.png"), None),
        ("s3", "sr", "", struct(None, "s3://mixed/inputs/low.png"), None),
        ("bad-none", "sr", "", None, None),
        ("bad-corrupt", "sr", "", struct(b"this is not an image"), None),
        ("bad-uri", "sr", "", struct(None, "s3://mixed/inputs/missing.png"), None),
        ("i1", "inpaint", "a yellow star", struct(png(32, 4)), half_mask(32)),
        ("i2", "inpaint", "a blue circle", struct(png(32, 5)), half_mask(32)),
        ("bad-mask", "inpaint", "a blue circle", struct(png(32, 6)), half_mask(16)),
        ("p1", "inpaint_plain", "a red square", struct(png(32, 7)), half_mask(32)),
        ("m1", "img2img", "a purple triangle", struct(png(32, 8)), None),
        ("bad-task", "upscale_x8", "x", None, None),
    ]
    table = pa.Table.from_pylist(
        [dict(zip(("id", "task", "prompt", "image", "mask"), r)) for r in rows],
        schema=pa.schema([("id", pa.string()), ("task", pa.string()), ("prompt", pa.string()),
                          ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                          ("mask", pa.binary())]),
    )
    manifest = write_manifest("s3://mixed/manifest.parquet", table)
    stats = run_job(mixed_spec(manifest))
    assert (stats.rows, stats.error) == (len(rows), 5)
    return {"out": {r["id"]: r for r in read_output(MIXED_OUTPUT).to_pylist()}, "inputs": {r[0]: r for r in rows}}


def test_every_row_comes_back_once(mixed):
    assert sorted(mixed["out"]) == sorted(mixed["inputs"])
    assert sum(r["status"] == "ok" for r in mixed["out"].values()) == 9


def test_super_resolution_of_16px_gives_64px(mixed):
    for row_id in ("s1", "s2", "s3"):
        row = mixed["out"][row_id]
        assert row["status"] == "ok", row["error"]
        assert decode(row["image"]["bytes"]).shape == (64, 64, 3)
        assert (row["width"], row["height"], row["stages"]) == (64, 64, ["super_resolution"])


def test_cascade_in_one_job(mixed):
    fs, path = storage.filesystem(MIXED_OUTPUT)
    # Nothing but the dataset: no intermediate output between the two stages.
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path))
    assert names == ["README.md", "_SUCCESS", "_job.json", "_stats.json", "data"]
    for row_id in ("c1", "c2"):
        row = mixed["out"][row_id]
        assert row["status"] == "ok", row["error"]
        assert decode(row["image"]["bytes"]).shape == (128, 128, 3)
        assert row["stages"] == ["text_to_image", "super_resolution"]
        assert row["model"] == "builtin:tiny-sd"
        records = json.loads(row["stage_params"])
        assert [(r["kind"], r["model"], r["width"]) for r in records] == [
            ("text_to_image", "builtin:tiny-sd", 32), ("super_resolution", "builtin:tiny-upscaler", 128)]
        assert records[1]["noise_level"] == 30 and records[1]["steps"] == 3
        # Both built-in models share one text encoder: the second stage reuses the embeddings.
        assert [r["text_embeds"] for r in records] == ["computed", "reused"]


def test_inpainting_keeps_unmasked_pixels(mixed):
    for row_id in ("i1", "i2", "p1"):
        row = mixed["out"][row_id]
        assert row["status"] == "ok", row["error"]
        out = decode(row["image"]["bytes"])
        original = decode(mixed["inputs"][row_id][3]["bytes"])
        assert out.shape == (32, 32, 3)
        assert np.array_equal(out[:, :16], original[:, :16])  # black half kept
        assert not np.array_equal(out[:, 16:], original[:, 16:])  # white half repainted
    assert json.loads(mixed["out"]["p1"]["stage_params"])[0]["model"] == "builtin:tiny-sd"


def test_image_to_image(mixed):
    row = mixed["out"]["m1"]
    assert row["status"] == "ok", row["error"]
    assert decode(row["image"]["bytes"]).shape == (32, 32, 3)
    assert json.loads(row["stage_params"])[0]["strength"] == 0.6


@pytest.mark.parametrize("row_id, message", [
    ("bad-none", "image: missing"),
    ("bad-corrupt", "image: not a readable image"),
    ("bad-uri", "image: no file at s3://mixed/inputs/missing.png"),
    ("bad-mask", "mask: size 16x16 differs from the image's 32x32"),
    ("bad-task", "task: 'upscale_x8' is not a flow of this job"),
])
def test_bad_inputs_are_error_rows(mixed, row_id, message):
    row = mixed["out"][row_id]
    assert row["status"] == "error" and row["image"] is None
    assert row["error"].startswith(message), row["error"]


@pytest.mark.parametrize("form", ["bytes", "uri"])
def test_image_column_as_bytes_or_uri(form, bucket, tmp_path):
    """A plain binary or string `image` column (the mixed job's are structs): the job's steps, run
    in this process, read both."""
    storage.write_bytes(f"{bucket}/in/a.png", png(16, 11))
    local = tmp_path / "b.png"
    local.write_bytes(png(16, 12))
    if form == "bytes":
        images = [png(16, 11), png(16, 12)]
    else:
        images = [f"{bucket}/in/a.png", str(local)]
    manifest = write_manifest(f"{bucket}/m.parquet", [{"id": "a", "image": images[0]}, {"id": "b", "image": images[1]}])
    # The local file lies outside the manifest's bucket: allowed_prefixes lets the job read it.
    spec = parse_spec({"manifest": manifest, "output": f"{bucket}/out",
                       "storage": {"allowed_prefixes": [str(tmp_path)]},
                       "stages": [{"kind": "super_resolution", **FAST}]})
    rows = run_in_process(spec).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert {r["id"]: decode(r["image"]["bytes"]).shape for r in rows} == {"a": (64, 64, 3), "b": (64, 64, 3)}
