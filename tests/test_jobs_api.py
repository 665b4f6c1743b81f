"""`jobs.generate` submitted through the Ray Jobs API to a real head started by this test.

The head gets its own 127.0.0.1 ports and temp dir, runs in its own process group, and is
stopped by killing that group's processes (never `ray stop`, which would kill every Ray here).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from tests.conftest import free_port, prompts_manifest, read_output, write_manifest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


START_TRIES = 3  # a head that exits before its Jobs API answers is started again on fresh ports


class _HeadExited(RuntimeError):
    pass


def _wait_for_jobs_api(address: str, head: subprocess.Popen, log: Path) -> JobSubmissionClient:
    deadline = time.time() + 120
    while True:
        try:
            return JobSubmissionClient(address)
        except ConnectionError:  # the dashboard is still starting
            if head.poll() is not None:
                raise _HeadExited("ray head exited:\n" + log.read_text()) from None
            if time.time() > deadline:
                raise RuntimeError("ray head did not start:\n" + log.read_text()) from None
            time.sleep(1)


def _start_head(temp_dir: str, attempt: int) -> tuple[subprocess.Popen, JobSubmissionClient | None, str]:
    """Start a head on free ports; return it, its Jobs API client (None when the head exited
    first, as it does when another process took one of its ports after free_port picked it) and
    its log."""
    dashboard = free_port()
    ports = {
        "--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
        "--node-manager-port": free_port(), "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port(),
    }
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp_dir}",
           "--min-worker-port=0", "--max-worker-port=0",
           *[f"{k}={v}" for k, v in ports.items()]]
    log = Path(temp_dir) / f"head-{attempt}.log"
    # Token auth would turn itself on where ~/.ray/auth_token exists; this head serves loopback
    # only, so it runs without, the same on every machine.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    with open(log, "w") as out:
        head = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        return head, _wait_for_jobs_api(f"http://127.0.0.1:{dashboard}", head, log), log.read_text()
    except _HeadExited:
        return head, None, log.read_text()
    except BaseException:
        _stop(head)
        raise


@pytest.fixture
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="sgray", dir="/tmp")  # short: Ray's socket paths are length-limited
    heads, logs = [], []
    try:
        for attempt in range(START_TRIES):
            head, client, log = _start_head(temp_dir, attempt)
            heads.append(head)
            if client is not None:
                break
            print(f"ray head attempt {attempt} exited before its Jobs API answered; trying fresh ports")
            logs.append(log)
        else:
            raise RuntimeError(f"ray head did not start in {START_TRIES} tries:\n" + "\n---\n".join(logs))
        yield client
    finally:
        for head in heads:
            _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop(head: subprocess.Popen) -> None:
    """Stop exactly the processes this test started: the head's process group (a graceful SIGTERM
    first, then SIGKILL for whatever of the group is left)."""
    _signal_group(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(head.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


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
