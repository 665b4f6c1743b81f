"""Node loss in a real text_to_image job: the node that runs the stage and every CPU step is lost
mid-run, its replacement joining only later. The job waits, then finishes with every row exactly
once, each image the one an unfaulted run makes (tests/fault_runs.py).

tests/fault_scenarios.py runs it on a two-node ray.cluster_utils.Cluster in a process of its own
and reports what it lost and what the job did meanwhile.
"""

from __future__ import annotations

from tests.fault_runs import assert_every_row_once, run_scenario
from tests.fault_scenarios import NODE_CPUS, REPLACEMENT_DELAY_S, STAGE_ACTOR


def test_node_running_the_stage_lost_mid_run(tmp_path):
    result = run_scenario("node_loss", tmp_path)
    lost = result["lost"]
    assert lost["title"] == f"ray::{STAGE_ACTOR}.submit"
    assert lost["node"] == "worker"
    # The head offers no CPUs: every CPU step of the job ran on the lost node, beside the actor.
    assert lost["cpus"] == {"head": 0, "worker": NODE_CPUS}
    assert 0 < lost["shards_at_loss"] < result["stats"]["shards"]
    # Until the replacement joined, nothing fitted anywhere: the job waited, alive, without progress.
    waited = result["waited"]
    assert waited["seconds"] == REPLACEMENT_DELAY_S and waited["job_alive"]
    assert waited["shards_after"] == waited["shards_before"] and waited["stage_actors"] == 0
    assert result["restarted_on"] == "replacement"
    assert_every_row_once(result)
