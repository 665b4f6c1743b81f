"""The test side of tests/fault_scenarios.py: run a scenario in a process of its own and check
that its job finished with every row exactly once (_SUCCESS, `shardgen verify --manifest`, no
leftover file in data/, dot-files included), each row's image the one an unfaulted run makes
(compared by sha256). Each scenario has a test file of its own, so that the two (the longest tests)
run side by side on the suite's two workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fault_scenarios import STAGE_OPTIONS, reference
from tests.helpers import (
    REPO,
    assert_finished_exactly_once,
    by_id,
    prompts_manifest,
    read_output,
    subprocess_env,
    write_manifest,
)

ROWS = 40


def run_scenario(name: str, tmp_path: Path) -> dict:
    manifest = write_manifest(str(tmp_path / "manifest.parquet"), prompts_manifest(ROWS))
    output = str(tmp_path / "output")
    done = subprocess.run([sys.executable, "-m", "tests.fault_scenarios", name, manifest, output],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] is None, result["error"]
    assert_finished_exactly_once(output, manifest)
    unfaulted = reference(manifest, str(tmp_path / "unused"), **STAGE_OPTIONS[name])
    return {**result, "output": read_output(output), "unfaulted": unfaulted}


def assert_every_row_once(result: dict) -> None:
    out = result["output"]
    assert sorted(out.column("id").to_pylist()) == [row["id"] for row in prompts_manifest(ROWS)]
    assert set(out.column("status").to_pylist()) == {"ok"}
    assert (result["stats"]["rows"], result["stats"]["ok"]) == (ROWS, ROWS)
    # A row generated again after a fault is the same image as without the fault.
    assert len(result["unfaulted"]) == ROWS and len(set(result["unfaulted"].values())) == ROWS
    assert by_id(out, "image_sha256") == result["unfaulted"]
