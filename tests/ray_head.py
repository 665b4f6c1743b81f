"""A real `ray start --head` on 127.0.0.1 for tests that use the Jobs API.

The head gets its own 127.0.0.1 ports and temp dir, runs in its own process group, and is
stopped by killing that group's processes (never `ray stop`, which would kill every Ray here).
Free ports are picked before the head binds them, so another process may take one in between,
and on a loaded machine the raylet may give up on its dashboard agent (it waits a fixed 15 s for
the agent's port file, not configurable in Ray 2.60): a head that exits before it takes a job is
started again, on new ports.
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

from tests.helpers import free_port

RAY = str(Path(sys.executable).with_name("ray"))
STARTS = 5
STOP_WAIT_S = 3


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
    # SIGTERM first, then SIGKILL for whatever of the group is left). `ray start --block` itself
    # rarely exits on SIGTERM (its parts do): a longer wait only added 20 s to each test.
    _signal_group(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(head.pid, signal.SIGKILL)


def _first_in_line() -> None:
    """Run the head's start ahead of other work on this machine where allowed (root): its raylet
    gives its dashboard agent a fixed 15 s, which a busy machine's agent can overrun."""
    try:
        os.nice(-19)
    except PermissionError:
        pass


def _ready(address: str, head: subprocess.Popen, headers: dict) -> JobSubmissionClient | None:
    """The Jobs API client once the head takes jobs; None if the head died first (a port was
    taken, or on a loaded machine a part of it did not start in time). The Jobs API answers a
    little before the head's agent takes jobs ("No available agent to submit job"): a no-op job
    proves it does."""
    deadline = time.time() + 180
    client, job = None, None
    while job is None or not client.get_job_status(job).is_terminal():
        if head.poll() is not None:
            return None
        if time.time() > deadline:
            raise RuntimeError(f"the Ray head at {address} did not take a job in 180 s")
        try:
            client = client or JobSubmissionClient(address, headers=headers)
            job = job or client.submit_job(entrypoint="true", submission_id=f"head-ready-{time.time_ns()}")
        except RuntimeError as err:  # a client that answers, but no agent yet
            if "No available agent" not in str(err):
                raise
        except OSError:  # refused or dropped connections while the dashboard starts (ConnectionError too)
            pass
        time.sleep(1)
    return client


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
            head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                    preexec_fn=_first_in_line)
            try:
                address = f"http://127.0.0.1:{ports['--dashboard-port']}"
                client = _ready(address, head, headers)
                if client is None:
                    if start + 1 == STARTS:
                        raise RuntimeError("ray head did not start:\n" + log_path.read_text())
                    continue
                os.setpriority(os.PRIO_PGRP, head.pid, 0)  # started: the jobs run at the usual priority
                yield Head(address, client, log_path)
                return
            finally:
                _stop(head)
                shutil.rmtree(temp_dir, ignore_errors=True)
