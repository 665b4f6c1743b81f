"""Worker and node faults in a real text_to_image job: the stage actor SIGKILLed while it loads
its model and again mid-batch, and the node that runs it lost mid-run. Each job finishes with
every row exactly once.

The faults are injected by tests/fault_scenarios.py in a process of its own with its own Ray (a
local one, or a two-node ray.cluster_utils.Cluster), so that they cannot touch the session's Ray;
it reports what it killed, and these tests check that the fault really hit the stage actor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import prompts_manifest, read_output, write_manifest

REPO = Path(__file__).resolve().parents[1]
ROWS = 40


def run_scenario(name: str, tmp_path: Path) -> dict:
    manifest = write_manifest(str(tmp_path / "manifest.parquet"), prompts_manifest(ROWS))
    output = str(tmp_path / "output")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "tests.fault_scenarios", name, manifest, output],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] is None, result["error"]
    return {**result, "output": read_output(output)}


def assert_every_row_once(result: dict) -> None:
    out = result["output"]
    assert sorted(out.column("id").to_pylist()) == [row["id"] for row in prompts_manifest(ROWS)]
    assert set(out.column("status").to_pylist()) == {"ok"}
    assert all(out.column("image_sha256").to_pylist())
    assert (result["stats"]["rows"], result["stats"]["ok"]) == (ROWS, ROWS)


def test_stage_actor_sigkilled_while_loading_and_mid_batch(tmp_path):
    result = run_scenario("actor_sigkill", tmp_path)
    loading, working = result["killed"]
    assert "TextToImageStage" in loading["title"] and loading["title"].endswith(".__init__")
    assert "TextToImageStage" in working["title"] and working["title"].endswith(".submit")
    assert loading["pid"] != working["pid"]  # the second kill hit the restarted actor
    assert 0 < result["shards_at_kill"] < result["stats"]["shards"]  # rows were done and left to do
    assert_every_row_once(result)


def test_node_running_the_stage_lost_mid_run(tmp_path):
    result = run_scenario("node_loss", tmp_path)
    lost = result["lost"]
    assert "TextToImageStage" in lost["title"] and lost["title"].endswith(".submit")
    assert lost["node"] == "worker"
    assert 0 < lost["shards_at_loss"] < result["stats"]["shards"]
    assert result["restarted_on"] == "replacement"
    assert_every_row_once(result)
