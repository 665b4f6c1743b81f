"""Resume after a crash: a rerun generates only the ids that no published shard holds, and the
finished dataset holds every manifest id exactly once."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from pipeline import done_ids
from pipeline.cli import main
from pipeline.job import run_job
from pipeline.spec import load_spec_file
from pipeline.stats import Stats
from tests.helpers import (
    REPO,
    assert_finished_exactly_once,
    by_id,
    prompts_manifest,
    read_output,
    subprocess_env,
    write_manifest,
)

KILL_AFTER_SHARDS = 2


def write_spec(tmp_path: Path, rows: int, output: str, fmt: dict | None = None, **stage) -> Path:
    manifest = write_manifest(str(tmp_path / "manifest.parquet"), prompts_manifest(rows))
    spec = {
        "manifest": manifest,
        "output": output,
        "stages": [{"kind": "text_to_image", "steps": 4, "width": 32, "height": 32, "batch_size": 2, **stage}],
        "format": {"rows_per_shard": 4, **(fmt or {})},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def shard_digests(output: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((output / "data").glob("*.parquet"))}


def images_by_id(output: Path) -> dict[str, str]:
    return by_id(read_output(str(output)), "image_sha256")


def assert_every_id_once(output: Path, rows: int) -> None:
    ids = read_output(str(output)).column("id").to_pylist()
    assert sorted(ids) == [f"row-{i:03d}" for i in range(rows)]
    stats = Stats.from_json((output / "_stats.json").read_text())
    assert stats.rows == stats.ok == rows and stats.shards == len(list((output / "data").iterdir()))


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def test_driver_sigkill_then_rerun_completes_exactly_once(tmp_path, ray_local):
    """The shards that the killed run published by time (its shard of 1000 rows never filled)
    are kept, and the rerun makes the rest."""
    rows = 32
    output = tmp_path / "out"
    spec = write_spec(tmp_path, rows, str(output), {"rows_per_shard": 1000, "publish_every_minutes": 0.02}, steps=20)
    # The driver in its own process group, with its own local Ray (not the session's).
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--spec", str(spec)], cwd=REPO,
                              env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        # Killed once KILL_AFTER_SHARDS shards are published (one every 1.2 s), not after a random
        # delay: mid-job, since what is left of 32 rows of 20 steps takes far longer than a poll.
        deadline = time.time() + 540  # a bound for a failure, not a wait: Ray and the model start first
        while len(list(output.glob("data/*.parquet"))) < KILL_AFTER_SHARDS:
            assert driver.poll() is None, driver.stdout.read().decode()
            assert time.time() < deadline, f"{KILL_AFTER_SHARDS} shards were not published in time"
            time.sleep(0.1)
        assert driver.poll() is None, "the job ended before the kill"
        # The driver and its Ray (GCS, raylet, workers: its process group) at once, so that no
        # worker of it publishes after the snapshot below (late writes have a test of their own).
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    while group_alive(driver.pid):
        assert time.time() < deadline, "the killed driver's processes did not end"
        time.sleep(0.1)
    assert not (output / "_SUCCESS").exists()
    before = shard_digests(output)
    before_images = images_by_id(output)
    assert 0 < len(before_images) < rows

    stats = run_job(load_spec_file(spec))

    assert_every_id_once(output, rows)
    assert_finished_exactly_once(str(output), str(tmp_path / "manifest.parquet"))
    after = shard_digests(output)
    assert {name: after.get(name) for name in before} == before  # published shards are kept untouched
    after_images = images_by_id(output)
    assert {i: after_images[i] for i in before_images} == before_images
    assert stats.rows_this_run == rows - len(before_images) and len(stats.runs) == 2


def test_rerun_skips_written_ids_and_cleans_leftovers(tmp_path, ray_local, capsys, monkeypatch):
    """The rerun skips the done ids by the partitioned anti-join (forced here at 8 done ids, 3 a
    partition actor; pipeline/done_ids.py), regenerates the lost shard's rows as the same images and
    removes a crash's leavings."""
    rows = 12
    output = tmp_path / "out"
    spec = write_spec(tmp_path, rows, str(output), batch_size=3)
    assert main(["run", "--spec", str(spec)]) == 0
    reference = images_by_id(output)
    shards = sorted((output / "data").glob("*.parquet"))
    # Batches of 3 rows, shards of 4: each shard holds 4 rows all the same.
    assert [pq.ParquetFile(s).metadata.num_rows for s in shards] == [4, 4, 4]
    # A crash's leavings: no _SUCCESS, a lost shard, a temporary file of an interrupted write, and
    # a shard that a dead run's worker published late, repeating ids of a kept shard.
    (output / "_SUCCESS").unlink()
    lost = set(pq.read_table(shards[0], columns=["id"]).column("id").to_pylist())
    shards[0].unlink()
    (output / "data" / ".part-x.parquet.tmp-99").write_bytes(b"partial")
    late = output / "data" / "part-99991231T000000-ffffff-00000-0000.parquet"
    shutil.copy(shards[1], late)
    capsys.readouterr()
    # The unfinished output resumes only the job that wrote it: a changed spec and another manifest
    # (at the same path) are each refused, exit 2, before any model loads.
    assert main(["run", "--spec", str(write_spec(tmp_path, rows, str(output), batch_size=3, steps=5))]) == 2
    assert "changed: stages" in capsys.readouterr().err
    spec = write_spec(tmp_path, rows, str(output), batch_size=3)  # the job's spec again
    write_manifest(str(tmp_path / "manifest.parquet"), [{"id": "other", "prompt": "a red square"}])
    assert main(["run", "--spec", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "'row-" in err and "another manifest" in err
    spec = write_spec(tmp_path, rows, str(output), batch_size=3)  # and its manifest
    monkeypatch.setattr(done_ids, "PARTITIONED_FROM", 1)
    monkeypatch.setattr(done_ids, "IDS_PER_PARTITION", 3)

    assert main(["run", "--spec", str(spec)]) == 0

    out = capsys.readouterr().out
    assert f"{rows - len(lost)} of {rows} ids" in out
    assert f"skipping {rows - len(lost)} done id(s) partitioned in 3 partition actor(s)" in out
    assert_every_id_once(output, rows)
    assert_finished_exactly_once(str(output), str(tmp_path / "manifest.parquet"))
    assert images_by_id(output) == reference  # regenerated rows are the same images
    assert not late.exists() and not (output / "data" / ".part-x.parquet.tmp-99").exists()
    stats = Stats.from_json((output / "_stats.json").read_text())
    assert stats.rows_this_run == len(lost) and len(stats.runs) == 2
