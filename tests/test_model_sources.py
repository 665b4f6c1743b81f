"""An ``s3://`` model folder that loads: copied once per node into the model cache (two actors of a
job race for it), checked on the node, its downloads retried through storage faults (moto's server
behind tests/s3_fault_proxy.py). The refusals of a pickle-only or custom-code folder are in
test_security.py."""

from __future__ import annotations

import threading
from collections import Counter
from hashlib import sha256
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.errors import ModelError
from pipeline.job import run_job
from pipeline.models.resolve import COMPLETE_MARKER, build_builtin, cache_root, resolve
from pipeline.spec import StorageSpec, parse_spec
from tests.helpers import prompts_manifest, read_output, write_manifest
from tests.s3_fault_proxy import FaultProxy


class CountingProxy(FaultProxy):
    """A FaultProxy that also tells, per (method, path), how many requests it forwarded unfaulted."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clean: Counter[tuple[str, str]] = Counter()
        self._count_lock = threading.Lock()

    def draw(self, method: str, path: str) -> tuple[str | None, bool]:
        fault, reaches_server = super().draw(method, path)
        if fault is None:
            with self._count_lock:
                self.clean[(method, path.split("?")[0])] += 1
        return fault, reaches_server


@pytest.fixture(scope="module")
def tiny_sd(environment) -> tuple[Path, list[str]]:
    folder = build_builtin("tiny-sd")
    return folder, sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                          if p.is_file() and p.name != COMPLETE_MARKER)


def _upload(folder: Path, files: list[str], uri: str) -> None:
    for name in files:
        storage.write_bytes(f"{uri}/{name}", (folder / name).read_bytes())


def _cache_folder(uri: str) -> Path:
    """Where a node caches the model folder at ``uri``."""
    return cache_root() / "remote" / sha256(uri.encode()).hexdigest()[:16]


def test_s3_model_is_copied_once_per_node_with_retries_and_runs(tiny_sd, bucket, s3_endpoint, tmp_path, ray_local):
    folder, files = tiny_sd
    uri = f"{bucket}/models/tiny-sd"
    _upload(folder, files, uri)
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompts_manifest(3))
    # Every third GET of a model file is a fault (503 SlowDown, 500, a dropped connection and a
    # body cut off midway, in turn); the two stages' actors load the same folder at once.
    with CountingProxy(s3_endpoint, every=3, methods=("GET",), path_contains="/models/") as proxy:
        spec = parse_spec({
            "manifest": manifest, "output": str(tmp_path / "out"), "storage": {"endpoint_url": proxy.url},
            "stages": [{"kind": kind, "model": uri, "steps": 2, "width": 32, "height": 32, "cpus_per_actor": 0.75}
                       for kind in ("text_to_image", "image_to_image")],
        })
        stats = run_job(spec)

    assert (stats.ok, stats.error) == (3, 0)
    rows = read_output(str(tmp_path / "out")).to_pylist()
    assert all(r["stages"] == ["text_to_image", "image_to_image"] for r in rows)
    assert sum(proxy.counts.values()) >= 3, proxy.counts  # the model's downloads met faults and were retried
    key = f"/{bucket[5:]}/models/tiny-sd/"
    fetched = {path[len(key):]: n for (method, path), n in proxy.clean.items()
               if method == "GET" and path.startswith(key)}
    # Each file came whole once; model_index.json once more, read by the driver's check.
    assert fetched == {**{name: 1 for name in files}, "model_index.json": 2}
    copy = _cache_folder(uri)
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()) == sorted([*files, COMPLETE_MARKER])
    assert not copy.with_name(copy.name + ".partial").exists()
    assert all((copy / name).read_bytes() == (folder / name).read_bytes() for name in files)


def test_s3_model_copy_is_checked_where_it_loads(tiny_sd, bucket, monkeypatch, tmp_path):
    """A node checks the folder it is about to load, its cached copy included: a file planted
    there after the copy (a Python file) makes it refuse to load the model."""
    monkeypatch.setenv("SHARDGEN_CACHE", str(tmp_path / "cache"))
    folder, files = tiny_sd
    uri = f"{bucket}/models/tiny-sd"
    _upload(folder, files, uri)
    copy = resolve(uri, StorageSpec())
    assert copy.is_relative_to(tmp_path / "cache" / "remote")
    (copy / "unet" / "pipeline.py").write_text("raise SystemExit('ran model code')\n")
    with pytest.raises(ModelError, match=rf"model: {uri} ships Python code \(unet/pipeline.py\)"):
        resolve(uri, StorageSpec())
