"""`jobs.generate` submitted through the Ray Jobs API to a real head started by this test
(tests/ray_head.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml
from ray.job_submission import JobStatus

from tests import ray_head as heads
from tests.helpers import prompts_manifest, read_output, write_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ray_head():
    with heads.ray_head() as head:
        yield head.client


def test_generate_job_through_jobs_api(ray_head, tmp_path, environment):
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompts_manifest(5))
    output = tmp_path / "out"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "manifest": manifest,
        "output": "unused-overridden-below",
        "stages": [{"kind": "text_to_image", "steps": 3, "width": 32, "height": 32, "batch_size": 2}],
    }))

    job_id = ray_head.submit_job(
        entrypoint=f"{sys.executable} -m jobs.generate --spec {spec} --output {output}",
        runtime_env={"working_dir": str(REPO), "env_vars": {"SHARDGEN_CACHE": environment["SHARDGEN_CACHE"]}},
    )
    deadline = time.time() + 300
    while (status := ray_head.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish in time"
        time.sleep(1)

    logs = ray_head.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    assert "5 rows (5 ok, 0 error)" in logs
    table = read_output(str(output))
    assert sorted(table.column("id").to_pylist()) == [f"row-{i:03d}" for i in range(5)]
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert (output / "_SUCCESS").exists()
