"""Which Ray a run joins, and joining it quietly. Owned by the plan builder (pipeline/plan.py);
it imports Ray but not Ray Data, so that a dead address is found before the heavy imports."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import TypeVar

import ray

from pipeline.errors import ShardgenError
from pipeline.native_log import keep_native_lines_in_ray_logs

# How long a cluster address may take to answer before the run gives up on it.
CONNECT_TIMEOUT_S = 10
# Notices that Ray prints on every run and that a user cannot act on (shown with --verbose).
_NOTICES = {
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled",
    "ray.data._internal.progress": "Progress bars disabled",
}


class _DropNotice(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def cluster_address() -> str | None:
    """The cluster ray.init would join: RAY_ADDRESS, else the one a `ray start` on this machine
    recorded; None when Ray would start a local instance."""
    from ray._private.services import get_ray_address_from_environment

    address = get_ray_address_from_environment(None, None)
    return None if address in (None, "local") else address


def check_answers(address: str) -> None:
    """Fail fast, naming the address, when nothing listens there: ray.init would retry a dead
    address for minutes."""
    source = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "the address a `ray start` on this machine recorded"
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as err:
        raise ShardgenError(
            f"no Ray cluster answers at {address} ({source}): {err}. Start it, point RAY_ADDRESS at one that "
            "runs, or run locally instead with RAY_ADDRESS=local (a `ray start` that was stopped leaves its "
            "address behind until `ray start` runs again)") from None


def check_address() -> str | None:
    """The address of the cluster a run joins, checked to answer (None: a local Ray, or this
    process has joined one already)."""
    if ray.is_initialized():
        return None
    address = cluster_address()
    if address is not None and not address.startswith("ray://") and address != "auto":
        check_answers(address)
    return address


def ensure_ray(verbose: bool = False) -> None:
    """Connect to the cluster in RAY_ADDRESS (or the one this job was submitted to, or one that
    `ray start` runs here), else start a local Ray. Unless ``verbose``, the workers' output (model
    loading bars, library warnings) stays in Ray's log files and Ray Data shows no progress of its own."""
    if not ray.is_initialized():
        connect(check_address(), verbose)


# Ray gives a new local node a fixed 30 s to register; on a busy machine it can miss that ("The
# current node timed out during startup") although nothing is wrong: that start is torn down and
# made again, rather than the job failing.
LOCAL_START_TRIES = 3
T = TypeVar("T")


def retry_local_start(start: Callable[[], T], clean_up: Callable[[], object] | None = None) -> T:
    """``start()``'s result (a local Ray node started: ray.init, a test cluster's node), started
    again after ``clean_up()`` (default: ray.shutdown) when it failed only by missing Ray's
    registration time."""
    for attempt in range(1, LOCAL_START_TRIES + 1):
        try:
            return start()
        except Exception as err:  # noqa: BLE001 - only the start-up time-out is tried again
            if "timed out during startup" not in str(err) or attempt == LOCAL_START_TRIES:
                raise
            (clean_up or ray.shutdown)()
            print(f"shardgen: the local Ray did not start in time (try {attempt} of {LOCAL_START_TRIES}): "
                  "starting it again", file=sys.stderr)


def connect(address: str | None, verbose: bool = False) -> None:
    """ray.init on ``address`` (checked by check_address; None: a local Ray), quietly unless
    ``verbose``. A local start that times out is made again; a cluster's address fails at once."""
    if not verbose:
        for name, start in _NOTICES.items():
            logging.getLogger(name).addFilter(_DropNotice(start))

    def init():
        ray.init(address=address, include_dashboard=False, log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.WARNING)

    if address in (None, "local"):
        retry_local_start(init)
    else:
        init()
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = verbose
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        keep_native_lines_in_ray_logs()
