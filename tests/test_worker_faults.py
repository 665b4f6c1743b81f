"""Worker and node faults in a real text_to_image job: CPU tasks and the stage actor SIGKILLed
(the actor while it loads its model and again mid-batch), and the node that runs the stage and
the CPU steps lost mid-run, its replacement joining only later. Each job finishes with every row
exactly once, and each row's image is the one an unfaulted run makes (compared by sha256).

The faults are injected by tests/fault_scenarios.py in a process of its own with its own Ray (a
local one, or a two-node ray.cluster_utils.Cluster), so that they cannot touch the session's Ray;
it reports what it killed, and these tests check that each fault hit the worker it meant to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import prompts_manifest, read_output, write_manifest
from tests.fault_scenarios import REPLACEMENT_DELAY_S, STAGE_ACTOR, STAGE_OPTIONS, reference

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
    unfaulted = reference(manifest, str(tmp_path / "unused"), **STAGE_OPTIONS[name])
    return {**result, "output": read_output(output), "unfaulted": unfaulted}


def assert_every_row_once(result: dict) -> None:
    out = result["output"]
    assert sorted(out.column("id").to_pylist()) == [row["id"] for row in prompts_manifest(ROWS)]
    assert set(out.column("status").to_pylist()) == {"ok"}
    assert (result["stats"]["rows"], result["stats"]["ok"]) == (ROWS, ROWS)
    # A row generated again after a fault is the same image as without the fault.
    images = dict(zip(out.column("id").to_pylist(), out.column("image_sha256").to_pylist()))
    assert len(result["unfaulted"]) == ROWS and len(set(result["unfaulted"].values())) == ROWS
    assert images == result["unfaulted"]


def test_workers_sigkilled_mid_run(tmp_path):
    result = run_scenario("worker_sigkill", tmp_path)
    killed = result["killed"]
    assert killed["prepare"]["title"] == "ray::MapBatches(prepare_batch)"
    assert killed["loading"]["title"] == f"ray::{STAGE_ACTOR}.__init__"
    assert killed["batch"]["title"] == f"ray::{STAGE_ACTOR}.submit"
    assert killed["write"]["title"] == "ray::MapBatches(encode_batch)->Write"
    assert killed["loading"]["pid"] != killed["batch"]["pid"]  # the second kill hit the restarted actor
    assert 0 < result["shards_at_kill"] < result["stats"]["shards"]  # rows were done and left to do
    assert_every_row_once(result)


def test_node_running_the_stage_lost_mid_run(tmp_path):
    result = run_scenario("node_loss", tmp_path)
    lost = result["lost"]
    assert lost["title"] == f"ray::{STAGE_ACTOR}.submit"
    assert lost["node"] == "worker"
    # The head offers no CPUs: every CPU step of the job ran on the lost node, beside the actor.
    assert lost["cpus"] == {"head": 0, "worker": 3}
    assert 0 < lost["shards_at_loss"] < result["stats"]["shards"]
    # Until the replacement joined, nothing fitted anywhere: the job waited, alive, without progress.
    waited = result["waited"]
    assert waited["seconds"] == REPLACEMENT_DELAY_S and waited["job_alive"]
    assert waited["shards_after"] == waited["shards_before"] and waited["stage_actors"] == 0
    assert result["restarted_on"] == "replacement"
    assert_every_row_once(result)
