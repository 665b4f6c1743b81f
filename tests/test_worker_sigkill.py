"""Worker faults in a real text_to_image job: a CPU task and the stage actor SIGKILLed (the actor
while it loads its model and again mid-batch, after a shard), and a write task. The job finishes
with every row exactly once, each image the one an unfaulted run makes (tests/fault_runs.py).

The faults are injected by tests/fault_scenarios.py in a process of its own with its own local Ray,
so that they cannot touch the session's Ray; it reports what it killed, and the test checks that
each fault hit the worker it meant to.
"""

from __future__ import annotations

from tests.fault_runs import assert_every_row_once, run_scenario
from tests.fault_scenarios import STAGE_ACTOR


def test_workers_sigkilled_mid_run(tmp_path):
    result = run_scenario("worker_sigkill", tmp_path)
    killed = result["killed"]
    # Prepare is fused with the cut into blocks of batch multiples (plan._exact_blocks).
    assert killed["prepare"]["title"].startswith("ray::MapBatches(prepare_batch)->StreamingRepartition[")
    assert killed["loading"]["title"] == f"ray::{STAGE_ACTOR}.__init__"
    assert killed["batch"]["title"] == f"ray::{STAGE_ACTOR}.submit"
    assert killed["write"]["title"] == "ray::MapBatches(encode_batch)->Write"
    assert killed["loading"]["pid"] != killed["batch"]["pid"]  # the second kill hit the restarted actor
    assert 0 < result["shards_at_kill"] < result["stats"]["shards"]  # rows were done and left to do
    assert_every_row_once(result)
