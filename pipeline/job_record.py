"""_job.json: the spec as run (no credentials), the runs, the package versions and the times."""

from __future__ import annotations

import json
from datetime import datetime

from pipeline import layout, storage
from pipeline.spec import JobSpec

PACKAGES = ("shardgen", "ray", "torch", "diffusers", "transformers", "pyarrow", "fsspec", "s3fs")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def put_text(spec: JobSpec, name: str, text: str) -> None:
    """Write a small file at ``name`` relative to the output."""
    storage.write_bytes(storage.join(spec.output, name), text.encode(), spec.storage)


def write_job_file(spec: JobSpec, run_id: str, started: datetime, ended: datetime | None = None,
                   runs: list[str] | None = None) -> None:
    """Written when a run starts, so that a resumed run can check it is the same job, and again at
    the end."""
    job = {
        "run_id": run_id,
        "runs": runs or [run_id],
        "spec": spec.public_dict(),
        "versions": versions(),
        "started_at": started.isoformat(),
        "ended_at": ended.isoformat() if ended else None,
    }
    put_text(spec, layout.JOB, json.dumps(job, indent=2) + "\n")
