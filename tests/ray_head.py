"""A real `ray start --head` on 127.0.0.1 for tests that use the Jobs API.

The head gets its own 127.0.0.1 ports and temp dir, runs in its own process group, and is
stopped by killing that group's processes (never `ray stop`, which would kill every Ray here).
Free ports are picked before the head binds them, so another process may take one in between:
a head that exits before its Jobs API answers is started again on new ports.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ray.job_submission import JobSubmissionClient

from tests.conftest import free_port

RAY = str(Path(sys.executable).with_name("ray"))
STARTS = 3


@dataclass
class Head:
    address: str  # the Jobs API, http://127.0.0.1:PORT
    client: JobSubmissionClient
    log: Path


def _ports() -> dict[str, int]:
    names = ("--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
             "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--metrics-export-port", "--runtime-env-agent-port")
    return {name: free_port() for name in names}


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _stop(head: subprocess.Popen) -> None:
    # Stop exactly the processes this test started: the head's process group (a graceful
    # SIGTERM first, then SIGKILL for whatever of the group is left).
    _signal_group(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(head.pid, signal.SIGKILL)


def _client(address: str, head: subprocess.Popen, headers: dict) -> JobSubmissionClient | None:
    """The Jobs API client once it answers; None if the head died first (a port was taken)."""
    deadline = time.time() + 120
    while True:
        try:
            return JobSubmissionClient(address, headers=headers)
        except ConnectionError:  # the dashboard is still starting
            if head.poll() is not None:
                return None
            if time.time() > deadline:
                raise RuntimeError(f"the Ray head at {address} did not answer in 120 s") from None
            time.sleep(1)


def _wait_for_agent(client: JobSubmissionClient) -> None:
    """Until the head's agent takes jobs: the Jobs API answers a little before it does ("No
    available agent to submit job"). A no-op job proves it."""
    deadline = time.time() + 120
    while True:
        try:
            job = client.submit_job(entrypoint="true", submission_id=f"head-ready-{os.getpid()}-{time.time_ns()}")
            break
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
        except OSError:  # requests' ConnectionError: the dashboard dropped the request while starting
            if time.time() > deadline:
                raise
        time.sleep(1)
    while not client.get_job_status(job).is_terminal():
        time.sleep(0.5)


@contextmanager
def ray_head(env: dict[str, str] | None = None, num_cpus: int = 2) -> Iterator[Head]:
    """Start a head with ``env`` (default: this process's environment with token authentication
    off, the same on every machine); yield it; stop it."""
    env = env if env is not None else {**os.environ, "RAY_AUTH_MODE": "disabled"}
    token = env.get("RAY_AUTH_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for start in range(STARTS):
        temp_dir = tempfile.mkdtemp(prefix="sgray", dir="/tmp")  # short: Ray's socket paths are length-limited
        ports = _ports()
        cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               "--include-dashboard=true", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
               "--min-worker-port=0", "--max-worker-port=0", *[f"{k}={v}" for k, v in ports.items()]]
        log_path = Path(temp_dir) / "head.log"
        with open(log_path, "w") as log:
            head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
            try:
                address = f"http://127.0.0.1:{ports['--dashboard-port']}"
                client = _client(address, head, headers)
                if client is None:
                    if start + 1 == STARTS:
                        raise RuntimeError("ray head did not start:\n" + log_path.read_text())
                    continue
                _wait_for_agent(client)
                yield Head(address, client, log_path)
                return
            finally:
                _stop(head)
                shutil.rmtree(temp_dir, ignore_errors=True)
