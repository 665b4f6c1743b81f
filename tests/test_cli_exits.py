"""Commands end as they say: a success line means exit 0 (no abort at exit), a closed pipe ends a
command without a traceback, messages give the reason, Ray's native log lines stay in its log
files, and `validate` writes nothing."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import yaml

from pipeline.cli import main
from tests.helpers import prompts_manifest, write_manifest
from tests.synthetic_output import build

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local"}


def _cli(tmp_path, command: str, spec: dict) -> tuple[int, str, str]:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([command, "--spec", str(path)])
    return code, out.getvalue(), err.getvalue()


def test_a_missing_manifest_is_named_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    missing = tmp_path / "x" / "prompts.parquet"
    code, _, err = _cli(tmp_path, "validate", {"manifest": str(missing), "output": str(tmp_path / "out")})
    assert code == 2
    assert f"cannot read manifest {missing}: no such file or folder" in err


def test_validate_writes_nothing_for_a_random_weight_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    monkeypatch.setenv("SHARDGEN_CACHE", str(tmp_path / "cache"))
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompts_manifest(2))
    code, out, err = _cli(tmp_path, "validate", {"manifest": manifest, "output": str(tmp_path / "out"), "stages": [
        {"kind": "text_to_image", "model": "builtin:tiny-sd", "cpus_per_actor": 0.5},
        {"kind": "super_resolution", "model": "builtin:tiny-upscaler", "cpus_per_actor": 0.5}]})
    assert code == 0, err
    assert "shardgen: valid:" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.parquet", "spec.yaml"]  # no cache, no output


def _closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """The command with its stdout a pipe whose reader is gone (as `| head` once head exits)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], stdout=write, stderr=subprocess.PIPE,
                              env=ENV, text=True, timeout=120)
    finally:
        os.close(write)


def test_a_closed_pipe_ends_the_command_without_a_traceback():
    done = _closed_pipe("spec", "--schema")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr


def test_native_log_lines_are_dropped_from_stderr_and_the_rest_passes():
    script = textwrap.dedent("""
        import os, sys
        from pipeline.native_log import keep_native_lines_in_ray_logs
        keep_native_lines_in_ray_logs()
        os.write(2, b"[2026-12-07 12:28:52,006 E 30125 30125] core_worker.cc:2465: Actor with class name: "
                    b"'MapWorker' has constructor arguments in the object store and max_restarts > 0.\\n")
        os.write(2, b"a native line of another library\\n")
        print("shardgen: error: from Python", file=sys.stderr)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, env=ENV, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # Python's stderr goes straight out, the native lines through the filter: the order may differ.
    assert sorted(done.stderr.splitlines()) == ["a native line of another library", "shardgen: error: from Python"]


EXPORT_THREADS = textwrap.dedent("""
    import os, sys
    from pipeline.export import export_webdataset
    threads = lambda: len(os.listdir("/proc/self/task"))
    export_webdataset(sys.argv[1], sys.argv[2] + "/warm", log=lambda *_: None)  # imports and first use
    before = threads()
    export_webdataset(sys.argv[1], sys.argv[2] + "/again", log=lambda *_: None)
    print(before, threads())
""")


def test_export_succeeds_every_time_and_leaves_no_native_threads_behind(tmp_path):
    """`export webdataset` used to abort after its success line now and then (exit 134,
    "terminate called without an active exception"): Arrow's thread pools, started by reading the
    shards, were torn down at exit while their workers lived. It reads on its own thread now."""
    output = str(tmp_path / "out")
    build(output, str(tmp_path / "m.parquet"), rows=30, size=32, rows_per_shard=10, rows_per_task=10)
    done = subprocess.run([sys.executable, "-c", EXPORT_THREADS, output, str(tmp_path)], capture_output=True,
                          env=ENV, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    before, after = map(int, done.stdout.split())
    assert after == before, done.stdout

    def export(i: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "export", "webdataset", output,
                               str(tmp_path / f"wds-{i}")], capture_output=True, env=ENV, text=True, timeout=300)

    with ThreadPoolExecutor(4) as pool:  # four at once on two cores: a loaded machine
        runs = list(pool.map(export, range(4)))
    assert [r.returncode for r in runs] == [0] * 4, [r.stderr[-300:] for r in runs]
    assert all("shardgen: exported " in r.stdout and r.stderr == "" for r in runs)
