"""Ray's native (C++) log lines in the driver stay in Ray's log files.

Ray's core worker writes its log to the session's python-core-driver-*.log and copies every
error line to the process's stderr as well, e.g. on every job: `core_worker.cc:...: Actor ... has
constructor arguments in the object store and max_restarts > 0` (Ray Data's actor pools always
are). After keep_native_lines_in_ray_logs(), the driver's file descriptor 2 is a pipe: a thread
forwards what arrives to the real stderr, less the lines in Ray's native log format (already in
the log file). Python's own stderr writes to the real stderr directly, never through the pipe.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

# [2026-12-07 12:28:52,006 E 30125 30125] core_worker.cc:2465: ...
NATIVE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] [\w./-]+\.(cc|h):\d+: ")
_state: dict[str, object] = {}


def _forward(read_fd: int, real_fd: int) -> None:
    pending = b""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not NATIVE_LINE.match(line))
            if kept:
                os.write(real_fd, kept)
    if pending and not NATIVE_LINE.match(pending):
        os.write(real_fd, pending)


def keep_native_lines_in_ray_logs() -> None:
    """From now on, drop Ray's native log lines from this process's stderr (once per process).
    Nothing changes where stderr is already redirected (a test capturing it, an embedding program)."""
    if _state or sys.stderr is not sys.__stderr__:
        return
    sys.stderr.flush()
    real_fd = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = open(real_fd, "w", buffering=1, closefd=False, encoding=sys.stderr.encoding,  # noqa: SIM115
                      errors="backslashreplace")
    thread = threading.Thread(target=_forward, args=(read_fd, real_fd), name="shardgen-stderr", daemon=True)
    thread.start()
    _state.update(real_fd=real_fd, thread=thread)
    atexit.register(_restore)


def _restore() -> None:
    """Give file descriptor 2 back to the real stderr (what native code prints while the process
    ends goes straight there), then let the thread forward what the pipe still holds."""
    os.dup2(_state["real_fd"], 2)  # the pipe's last writer closes: the thread reads its end
    _state["thread"].join(timeout=2)
