"""Progress a person can read: one line with rows done, ok / error, images/s and time left (per
stage where there are several), and a quiet run otherwise."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline import layout, progress
from pipeline.job import run_job
from pipeline.spec import parse_spec
from pipeline.stats import Stats
from tests.helpers import prompts_manifest, write_manifest

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


class FakeClock:
    """Progress's clock and its stop event in one: each wait moves the time on by what was asked,
    and the event is set once ``until`` seconds have passed (no sleeping, no timing luck)."""

    def __init__(self, until: float):
        self.now, self.until, self.waits = 0.0, until, []

    def monotonic(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        return self.now >= self.until

    def set(self) -> None:
        self.now = self.until


def run_progress(monkeypatch, until: float, log=None, counts=None) -> tuple[FakeClock, list[tuple[float, str]]]:
    """A Progress run from 0 to ``until`` seconds on a fake clock: (the clock, (time, line) shown)."""
    clock = FakeClock(until)
    monkeypatch.setattr(progress, "time", clock)
    shown: list[tuple[float, str]] = []
    show = log or (lambda text: shown.append((clock.now, text)))
    bar = progress.Progress(4, {"text_to_image": 4}, lambda: dict(counts or {}), show)
    bar.stop = clock
    with bar:
        bar.thread.join()  # the loop runs to `until` on the fake clock, then the block ends
    return clock, shown


def test_a_line_every_interval_in_a_log_then_thinning_out(monkeypatch):
    """In a log: a line every LOG_INTERVAL_S (15 s) at first, then every quarter of the time so
    far, at most every LOG_INTERVAL_MAX_S (10 min)."""
    clock, shown = run_progress(monkeypatch, until=4 * 3600, counts={progress.DONE: 0, progress.OK: 0})
    times = [t for t, _ in shown]
    assert times[:5] == [15.0, 30.0, 45.0, 60.0, 75.0]  # every 15 s while a quarter of the age is less
    gaps = [b - a for a, b in zip(times, times[1:])]
    for at, gap in zip(times, gaps):
        assert gap == min(600.0, max(15.0, at / 4)), (at, gap)
    assert gaps[-1] == 600.0 and max(gaps) == 600.0  # four hours in: every ten minutes
    assert len(shown) == 40  # about 20 lines to reach ten-minute gaps at 40 min, then 20 more; not 960
    assert shown[0][1] == "shardgen: 0/4 rows (0 ok, 0 error), starting (15 s)"
    assert all("\r" not in text and "[" not in text for _, text in shown)  # a log gets lines, no bar
    assert clock.waits[0] == progress.LOG_INTERVAL_S == 15.0 and progress.LOG_INTERVAL_MAX_S == 600.0


def test_nothing_is_shown_after_the_block_ends(monkeypatch):
    counts = {progress.DONE: 0, progress.OK: 0}
    lines: list[str] = []
    clock = FakeClock(until=60)
    monkeypatch.setattr(progress, "time", clock)
    bar = progress.Progress(4, {"text_to_image": 4}, lambda: dict(counts), lines.append)
    bar.stop = clock
    with bar:
        bar.thread.join()
        counts.update({progress.DONE: 4, progress.OK: 3})
    assert len(lines) == 3 and lines[-1].startswith("shardgen: 0/4 rows")  # at 15, 30 and 45 s


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_redrawn_in_place_every_half_second(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    clock, _ = run_progress(monkeypatch, until=3600, log=print, counts={progress.DONE: 2, progress.OK: 2})
    assert set(clock.waits) == {progress.TTY_INTERVAL_S} == {0.5}  # no thinning out in a terminal
    frames = terminal.getvalue().split("\r\x1b[K")[1:]  # each draw returns to the line's start and clears it
    assert len(frames) == 3600 / 0.5  # every half second until the end, then the last state at the end
    assert frames[0] == "shardgen: [##########..........] 2/4 rows (2 ok, 0 error), 4.00 images/s, 0 s left"
    assert frames[-1] == "shardgen: [##########..........] 2/4 rows (2 ok, 0 error), 0.00 images/s, 1 h 00 min left\n"
    assert all("\n" not in f for f in frames[:-1]) and frames[-1].endswith("\n")  # the bar's last state stays


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
