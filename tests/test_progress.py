"""Progress a person can read: one line with rows done, ok / error, images/s and time left (per
stage where there are several), and a quiet run otherwise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline import layout, progress
from pipeline.job import run_job
from pipeline.spec import parse_spec
from pipeline.stats import Stats
from tests.conftest import prompts_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]
TOTALS = {"text_to_image": 36, "super_resolution": 36, "inpainting": 12}
# What a run printed before: library warnings and loading bars of every actor, Ray's notices, Ray
# Data's operator table and its filter warning.
NOISE = ("[transformers]", "torchvision", "Loading pipeline components", "Loading weights", "Token authentication",
         "UserWarning", "INFO", "Running Dataset", "Parquet dataset sampling",
         ".cc:")  # Ray's native log lines ("core_worker.cc:2465: Actor ... max_restarts > 0") stay in its logs


def test_line_says_rows_rate_and_time_left_per_stage():
    counts = {progress.DONE: 24, progress.OK: 23, "text_to_image": 30, "super_resolution": 24, "inpainting": 12}
    assert progress.line(48, TOTALS, counts, 26.0) == (
        "shardgen: 24/48 rows (23 ok, 1 error), 0.88 images/s, 26 s left | "
        "text_to_image 30/36, super_resolution 24/36, inpainting 12/12")


def test_line_before_the_first_row_and_at_the_end():
    start = progress.line(8, {"text_to_image": 8}, {}, 75.0)
    assert start == "shardgen: 0/8 rows (0 ok, 0 error), starting (1 min 15 s)"
    done = progress.line(8, {"text_to_image": 8}, {progress.DONE: 8, progress.OK: 8}, 4.0, bar=True)
    assert done == "shardgen: [####################] 8/8 rows (8 ok, 0 error), 2.00 images/s, done"
    half = progress.line(3600 * 4, {"t": 1}, {progress.DONE: 3600, progress.OK: 3600}, 3600.0, bar=True)
    assert "[#####...............]" in half and "3 h 00 min left" in half


def test_a_line_every_interval_through_log(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.05)
    monkeypatch.setattr(progress, "LOG_INTERVAL_MAX_S", 0.05)
    counts = {progress.DONE: 0, progress.OK: 0}
    lines: list[str] = []
    with progress.Progress(4, {"text_to_image": 4}, lambda: dict(counts), lines.append):
        time.sleep(0.3)
        counts.update({progress.DONE: 4, progress.OK: 3})
        time.sleep(0.3)
    assert len(lines) >= 4 and lines[0].startswith("shardgen: 0/4 rows")
    assert lines[-1].startswith("shardgen: 4/4 rows (3 ok, 1 error)") and lines[-1].endswith("done")
    count = len(lines)
    time.sleep(0.2)
    assert len(lines) == count  # nothing after the block ends


def test_a_cascade_reports_each_stage(tmp_path, ray_local, monkeypatch):
    for name in ("LOG_INTERVAL_S", "LOG_INTERVAL_MAX_S"):  # a line every half second, however long it runs
        monkeypatch.setattr(progress, name, 0.5)
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompts_manifest(4))
    spec = parse_spec({"manifest": manifest, "output": str(tmp_path / "out"), "stages": [
        {"kind": "text_to_image", "steps": 2, "batch_size": 2}, {"kind": "super_resolution", "steps": 2}]})
    lines: list[str] = []
    stats = run_job(spec, log=lines.append)
    assert stats.ok == 4
    shown = [line for line in lines if " rows (" in line]
    assert shown and all("| text_to_image " in line and ", super_resolution " in line for line in shown)
    assert any(re.search(r"text_to_image [1-4]/4", line) for line in shown), shown


def test_a_run_prints_a_few_lines_and_the_summary_last(tmp_path):
    """Through the real CLI in a process of its own (its own local Ray), as `make demo` runs it."""
    manifest = write_manifest(str(tmp_path / "m.parquet"), prompts_manifest(2))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"manifest": manifest, "output": str(tmp_path / "out"),
                                    "stages": [{"kind": "text_to_image", "steps": 2}]}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local"}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--spec", str(spec)], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout
    assert len(lines) <= 8, done.stdout
    assert lines[0].startswith("shardgen: run ") and lines[-2].startswith("shardgen: 2 rows (2 ok, 0 error) in ")
    # Where the stage actor's time went, in the summary and in _stats.json.
    assert lines[-1].startswith("  stages: text_to_image (1 actor): load "), done.stdout
    (stage,) = Stats.from_json((tmp_path / "out" / layout.STATS).read_text()).stages
    assert stage.actors == 1 and 0 < stage.load_s < stage.first_image_s and stage.pipeline_s > 0
    assert stage.wait_s >= 0 and stage.gpu_busy is None and stage.peak_gpu_memory_gb is None  # no GPU here
    noise = [line for line in lines if any(n in line for n in NOISE)]
    assert not noise, noise


def test_lines_thin_out_as_the_run_ages(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.05)
    lines: list[str] = []
    with progress.Progress(4, {"text_to_image": 4}, dict, lines.append):
        time.sleep(1.6)
    # Every 0.05 s would be 32 lines; a quarter of the age once that is longer makes about 12.
    assert 3 <= len(lines) <= 20, len(lines)
