"""What a person watching a run sees: one progress line (a bar redrawn in a terminal, now and then
a line in a log), and no library chatter unless --verbose.

It reads counts through a function it is given (the plan counts rows with a small Ray actor), so
this module knows no Ray.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable

# Counter keys besides the stage kinds: rows done (through every stage, waiting for their shard),
# and how many of them are ok, and filtered (a safety checker flagged them).
DONE = "_done"
UNROUTED = "_unrouted"  # rows whose `task` names no flow
OK = "_ok"
FILTERED = "_filtered"
LOG_INTERVAL_S = 15.0
LOG_INTERVAL_MAX_S = 600.0
TTY_INTERVAL_S = 0.5
BAR_WIDTH = 20


def quiet_libraries() -> None:
    """Silence what transformers and diffusers print on import and load (the torchvision notice,
    "Loading pipeline components" bars), here and in the local Ray workers that inherit this
    environment."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", module=r"(ray|diffusers|transformers|torch)(\.|$)")
    # torchao (the quantize extra), imported by diffusers where installed, logs each CUDA kernel
    # library a CPU build lacks, and torch's pytree one line per enum it registers.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def line(total: int, totals: dict[str, int], counts: dict[str, int], elapsed: float, bar: bool = False) -> str:
    """One progress line: rows done of ``total``, ok / error, images/s, time left, and the rows
    each stage finished where there are several."""
    done, ok, filtered = counts.get(DONE, 0), counts.get(OK, 0), counts.get(FILTERED, 0)
    text = f"{done}/{total} rows ({ok} ok, {done - ok - filtered} error{f', {filtered} filtered' if filtered else ''})"
    if bar:
        filled = BAR_WIDTH * done // max(1, total)
        text = "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "] " + text
    if not done:
        text += f", starting ({_duration(elapsed)})"
    else:
        left = f"{_duration((total - done) * elapsed / done)} left" if done < total else "done"
        text += f", {ok / elapsed:.2f} images/s, {left}"
    if len(totals) > 1:
        text += " | " + ", ".join(f"{kind} {counts.get(kind, 0)}/{n}" for kind, n in totals.items())
    return "shardgen: " + text


class Progress:
    """While the ``with`` block runs, show a line from ``read()`` (counts by key) now and then: a
    bar redrawn in place when ``log`` is print to a terminal, else a line through ``log`` every
    LOG_INTERVAL_S seconds at first, less often as the job ages. In a terminal the bar's last state
    stays; in a log, the summary that follows says it."""

    def __init__(self, total: int, totals: dict[str, int], read: Callable[[], dict[str, int]], log=print):
        self.total, self.totals, self.read, self.log = total, totals, read, log
        self.tty = log is print and sys.stdout.isatty()
        self.interval = TTY_INTERVAL_S if self.tty else LOG_INTERVAL_S
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="shardgen-progress", daemon=True)
        self.start = time.monotonic()

    def __enter__(self) -> "Progress":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        if self.tty:
            self._show(final=True)

    def _loop(self) -> None:
        wait = self.interval
        while not self.stop.wait(wait):
            self._show()
            if not self.tty:
                # In a log the lines thin out as the job ages: a line every LOG_INTERVAL_S at first,
                # then every quarter of the time so far, at most every LOG_INTERVAL_MAX_S.
                wait = min(LOG_INTERVAL_MAX_S, max(self.interval, (time.monotonic() - self.start) / 4))

    def _show(self, final: bool = False) -> None:
        try:
            counts = self.read()
        except Exception:  # noqa: BLE001 - a missed update is no reason to stop the job
            return
        text = line(self.total, self.totals, counts, time.monotonic() - self.start, bar=self.tty)
        if self.tty:
            sys.stdout.write("\r\x1b[K" + text + ("\n" if final else ""))
            sys.stdout.flush()
        else:
            self.log(text)
