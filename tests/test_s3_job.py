"""A whole job against a real S3 API (moto's server): manifest in, dataset out, every row back."""

import hashlib
import io
import json
from datetime import datetime, timezone

import pyarrow.parquet as pq
from PIL import Image

from pipeline import storage
from pipeline.job import run_job
from tests.helpers import prompts_manifest, read_output, small_spec, write_manifest
from tests.test_readme_contracts import README_COLUMNS


def test_s3_manifest_to_s3_dataset(bucket, ray_local):
    rows = prompts_manifest(10, label="shape", seed=None)
    rows[3]["seed"] = 1234
    manifest = write_manifest(f"{bucket}/manifests/prompts.parquet", rows)
    output = f"{bucket}/datasets/run-001"
    spec = small_spec(manifest, output, width=48, height=32, model="builtin:tiny-sd")
    spec.format.rows_per_shard = 4

    called = datetime.now(timezone.utc)
    stats = run_job(spec)
    returned = datetime.now(timezone.utc)

    assert (stats.rows, stats.ok, stats.error) == (10, 10, 0)
    table = read_output(output)
    assert table.schema.names[: len(README_COLUMNS)] == README_COLUMNS
    assert "label" in table.schema.names  # pass-through column
    out = {r["id"]: r for r in table.to_pylist()}
    assert sorted(out) == [r["id"] for r in rows]
    for row in out.values():
        data = row["image"]["bytes"]
        image = Image.open(io.BytesIO(data))
        assert (image.format, image.size, image.mode) == ("PNG", (48, 32), "RGB")
        assert row["image_sha256"] == hashlib.sha256(data).hexdigest()
        assert (row["status"], row["error"], row["label"]) == ("ok", None, "shape")
        assert (row["width"], row["height"], row["steps"], row["guidance_scale"]) == (48, 32, 4, 7.5)
        assert row["model"] == "builtin:tiny-sd" and row["stages"] == ["text_to_image"]
        assert row["scheduler"] and row["elapsed_s"] > 0 and row["created_at"] is not None
    assert out["row-003"]["seed"] == 1234

    fs, path = storage.filesystem(output)
    shards = fs.ls(f"{path}/data")
    assert all(s.endswith(".parquet") for s in shards)
    rows_per_shard = [pq.ParquetFile(fs.open(s)).metadata.num_rows for s in shards]
    assert max(rows_per_shard) <= 4 and sum(rows_per_shard) == 10, rows_per_shard
    assert {"_stats.json", "_job.json", "README.md", "_SUCCESS"} <= {p.rsplit("/", 1)[-1] for p in fs.ls(path)}
    assert json.loads(fs.cat_file(f"{path}/_stats.json"))["ok"] == 10
    job = json.loads(fs.cat_file(f"{path}/_job.json"))
    assert job["spec"]["manifest"] == manifest and "torch" in job["versions"]
    # When the run started and ended: within the call, in order, and the run's elapsed time apart.
    started, ended = (datetime.fromisoformat(job[k]) for k in ("started_at", "ended_at"))
    assert called <= started < ended <= returned, job
    assert abs((ended - started).total_seconds() - stats.elapsed_s) < 0.5, (job, stats.elapsed_s)
    assert job["runs"] == [stats.run_id] == [job["run_id"]]

    # A rerun of the finished output is a no-op.
    again = run_job(spec)
    assert again.skipped and again.run_id == stats.run_id
    assert read_output(output).num_rows == 10
