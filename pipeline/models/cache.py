"""The model cache: one folder per model on each machine, filled once however many actors ask."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from filelock import FileLock

COMPLETE_MARKER = ".shardgen-complete"


def cache_root() -> Path:
    return Path(os.environ.get("SHARDGEN_CACHE", Path.home() / ".cache" / "shardgen"))


def fill_once(dest: Path, fill) -> Path:
    """Run ``fill(tmp)`` once per machine, even with many actors racing, and publish it at ``dest``."""
    if (dest / COMPLETE_MARKER).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if not (dest / COMPLETE_MARKER).exists():
            tmp = dest.with_name(dest.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            fill(tmp)
            (tmp / COMPLETE_MARKER).touch()
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
    return dest
