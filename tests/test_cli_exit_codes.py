"""Exit codes through `shardgen run` (the CLI's main): a model source that cannot be resolved is
refused with 2 before anything runs; object storage that never recovers in the middle of a job
(every shard PUT failing) is 1, with the URI named and no _SUCCESS; so is a job that Ray Data stops
for making no progress."""

from __future__ import annotations

import pytest
import ray.data

from pipeline.errors import EXIT_FAILED, EXIT_INVALID
from tests.helpers import prompts_manifest, run_cli, write_manifest
from tests.s3_fault_proxy import FaultProxy
from tests.test_s3_faults import stored, upscale_job


@pytest.mark.parametrize("model, message", [
    ("builtin:no-such-model", "model: unknown built-in builtin:no-such-model"),
    ("/no/such/model/folder", "model: no folder at /no/such/model/folder"),
    ("./relative/missing", "model: no folder at ./relative/missing"),
    # A hub id that cannot be had (no network here: offline, and not in the model cache).
    ("some-org/not-in-the-cache", "model: some-org/not-in-the-cache is not in the model cache on"),
    ("{bucket}/models/none", "model: no files under {bucket}/models/none"),  # the bucket fixture is s3://NAME
])
def test_unresolvable_model_source_exits_2(model, message, bucket, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompts_manifest(2))
    output = tmp_path / "out"
    code, _, err = run_cli(tmp_path, {"manifest": manifest, "output": str(output),
                                      "stages": [{"kind": "text_to_image", "model": model.format(bucket=bucket)}]})
    assert code == EXIT_INVALID, err
    assert f"shardgen: error: {message.format(bucket=bucket)}" in err
    assert not output.exists()  # refused before anything ran


def test_storage_that_never_recovers_mid_job_exits_1(bucket, s3_endpoint, tmp_path, capsys, ray_local):
    """The manifest, input images, _job.json and every other request go through; only the shard
    PUTs fail, every time: the job has started generating when storage gives out."""
    spec = upscale_job(bucket)
    with FaultProxy(s3_endpoint, always="internal", methods=("PUT",), path_contains="/data/part-") as proxy:
        data = spec.model_dump(mode="json")
        data["storage"] = {"endpoint_url": proxy.url, "max_attempts": 2}
        code, _, err = run_cli(tmp_path, data)
    assert code == EXIT_FAILED, err
    # The message the README promises, as its own line (not inside a worker's traceback).
    line = next((x for x in err.splitlines() if x.startswith("shardgen: error: ")), err[-3000:])
    assert line.startswith(f"shardgen: error: object storage: cannot write {spec.output}/data/part-"), err[-3000:]
    assert line.endswith("(each request was tried up to 2 times; see storage.max_attempts)"), line
    assert proxy.counts["internal"] >= 2 and proxy.forwarded > 0  # the job ran until its first shard
    assert stored(bucket, "out/_job.json", s3_endpoint) is not None  # written when the run started
    assert stored(bucket, "out/_SUCCESS", s3_endpoint) is None


def test_a_job_that_makes_no_progress_exits_1_naming_what_waited(tmp_path, monkeypatch, ray_local):
    """A stage whose actor fits on no node (4 CPUs an actor, the node has 2) on a cluster said to
    grow on demand: the job starts and waits for capacity that never comes. After Ray Data's
    no-progress timeout (cut here to 5 s on the DataContext, the field that
    RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S sets) it exits 1 with one line naming the wait and the
    stage, not Ray's traceback, and writes no _SUCCESS."""
    monkeypatch.setenv("SHARDGEN_AUTOSCALING", "1")
    monkeypatch.setattr(ray.data.DataContext.get_current(), "execution_no_progress_timeout_s", 5)
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompts_manifest(2))
    output = tmp_path / "out"
    code, out, err = run_cli(tmp_path, {"manifest": manifest, "output": str(output), "stages": [
        {"kind": "text_to_image", "model": "builtin:tiny-sd", "steps": 1, "width": 16, "height": 16,
         "cpus_per_actor": 4}]})
    assert code == EXIT_FAILED, err[-3000:]
    assert "the cluster has 2 CPUs and 0 GPUs: lower actors, cpus_per_actor or gpus_per_actor; waiting for the " \
        "autoscaler" in out + err
    line = next((x for x in err.splitlines() if x.startswith("shardgen: error: ")), err[-3000:])
    assert line.startswith("shardgen: error: the job made no progress for 5 s and Ray Data stopped it"), line
    assert "MapBatches(TextToImageStage): 0 active task(s)" in line and "run the job again to resume" in line
    assert "Traceback" not in err
    assert (output / "_job.json").exists() and not (output / "_SUCCESS").exists()
