"""Helpers the test modules share: manifests in and outputs out, images, the CLI in this process
or in a subprocess, and the check every finished run must pass (_SUCCESS, `shardgen verify
--manifest`, no stray file in data/, dot-files included).

Subprocesses get ``subprocess_env()``: this process's environment with the repository importable
and RAY_ADDRESS=local, so that a test never joins a `ray start` cluster left on the machine.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import yaml
from PIL import Image

from pipeline import layout, storage
from pipeline.spec import JobSpec, parse_spec

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- manifests and outputs ---------------------------------------------------------------------

def write_manifest(uri: str, rows: list[dict] | pa.Table) -> str:
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue().to_pybytes())
    return uri


def read_output(uri: str) -> pa.Table:
    """The output's rows (pyarrow skips dot-files: see data_files for every file in data/)."""
    fs, path = storage.arrow_filesystem(uri)
    return pq.read_table(f"{path}/{layout.DATA}", filesystem=fs)


def by_id(table: pa.Table, column: str) -> dict:
    """{id: the row's value of ``column``} of an output's rows (an image column gives its bytes)."""
    values = table.column(column)
    if pa.types.is_struct(values.type):
        values = pc.struct_field(values, "bytes")
    return dict(zip(table.column("id").to_pylist(), values.to_pylist()))


def data_files(uri: str) -> list[str]:
    """Every file under the output's data/, hidden ones included, relative to the output."""
    fs, path = storage.filesystem(uri)
    data = f"{path.rstrip('/')}/{layout.DATA}"
    return sorted(f[len(path.rstrip('/')) + 1:] for f in fs.find(data)) if fs.exists(data) else []


def prompts_manifest(n: int, **extra) -> list[dict]:
    colours = ["red", "green", "blue", "yellow"]
    return [{"id": f"row-{i:03d}", "prompt": f"a {colours[i % 4]} circle on a white background", **extra}
            for i in range(n)]


def small_spec(manifest: str, output: str, **stage) -> JobSpec:
    """A fast text_to_image job: 32x32, 4 steps."""
    return parse_spec({
        "manifest": manifest,
        "output": output,
        "stages": [{"kind": "text_to_image", "steps": 4, "width": 32, "height": 32, "batch_size": 4, **stage}],
    })


def run_in_process(spec: JobSpec) -> pa.Table:
    """The rows a one-flow job of ``spec`` writes, made in this process without Ray: the driver's
    manifest check, then the job's own steps (prepare, each stage, encode, the output's columns)
    over the whole manifest as one batch. A stage contract
    check that needs no job: this process has diffusers imported already, a stage actor would
    import it again."""
    import torch

    from pipeline import manifest
    from pipeline.access import for_job
    from pipeline.encode import encode_batch
    from pipeline.output_schema import to_output_table
    from pipeline.prepare import prepare_batch
    from pipeline.stages import stage_class

    manifest.check(spec)
    threads = torch.get_num_threads()
    try:
        table = prepare_batch(manifest.read(spec), spec.stages, spec.storage, for_job(spec), spec.limits)
        for position, stage in enumerate(spec.stages):
            table = stage_class(stage.kind)(stage, spec.storage, position,
                                            keep_text_embeds=position < len(spec.stages) - 1)(table)
        return to_output_table(encode_batch(table, spec.format))
    finally:
        torch.set_num_threads(threads)  # a stage sets its actor's thread count


def png(size: int | tuple[int, int], seed: int = 0, mode: str = "RGB") -> bytes:
    """A PNG of random pixels; ``size`` is a side or (width, height); mode RGB or L."""
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def half_mask(size: int) -> bytes:
    """A size x size mask PNG that repaints the right half."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, size // 2:] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return buf.getvalue()


# --- the CLI -----------------------------------------------------------------------------------

def cli(*argv: str) -> tuple[int, str, str]:
    """`shardgen ARGV` in this process: the exit code, stdout and stderr."""
    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def cli_output(*argv: str) -> tuple[int, str]:
    """`shardgen ARGV` in this process: the exit code, and stdout and stderr as one text in the
    order written."""
    from pipeline.cli import main

    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        code = main(list(argv))
    return code, out.getvalue()


def write_spec(folder: Path, spec: dict | JobSpec, name: str = "spec.yaml") -> Path:
    data = spec.model_dump(mode="json") if isinstance(spec, JobSpec) else spec
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def run_cli(tmp_path: Path, spec: dict | JobSpec, *flags: str, command: str = "run") -> tuple[int, str, str]:
    """`shardgen COMMAND --spec` in this process on ``spec`` (written into ``tmp_path``)."""
    return cli(command, "--spec", str(write_spec(tmp_path, spec)), *flags)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: this one, the repository importable, a local Ray."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "RAY_ADDRESS": "local", **extra}


def run_shardgen(*argv: str, env: dict[str, str] | None = None, timeout: float = 540, **kwargs
                 ) -> subprocess.CompletedProcess:
    """`shardgen ARGV` in a process of its own (``env``: subprocess_env() unless given)."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], cwd=kwargs.pop("cwd", REPO),
                          env=env if env is not None else subprocess_env(), capture_output=True, text=True,
                          timeout=timeout, **kwargs)


# --- exactly once ------------------------------------------------------------------------------

def assert_finished_exactly_once(output: str, manifest: str) -> None:
    """The run finished (_SUCCESS) and `shardgen verify --manifest` holds: every manifest id once,
    no other, counts, footers, status; and data/ holds nothing but the shards verify read (no
    leftover dot-file of a killed write, which pyarrow and verify would both pass over)."""
    from pipeline.inspect.output import Output
    from pipeline.verify import verify

    out = Output(output)
    assert out.finished, f"no {layout.SUCCESS} in {output}"
    report = verify(output, manifest=manifest, log=lambda _: None)
    assert not report.failures, report.to_json()
    assert data_files(output) == out.names, "data/ holds files that are not shards"


def as_a_fresh_process(monkeypatch) -> None:
    """Run the CLI in this process as a new command would: joined to no Ray (an earlier test of this
    xdist worker may have started the session's), and never starting one (ray.init fails the test)."""

    def refused(*args, **kwargs):
        raise AssertionError("ray.init was called: the dead address was not caught first")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)


def built_once(builders: dict, tmp_path_factory):
    """get(name) -> the folder ``builders[name]`` saved its pipeline into, built on first use only."""
    folders = {}

    def get(name: str):
        if name not in folders:
            folders[name] = builders[name](tmp_path_factory.mktemp(name))
        return folders[name]

    return get
