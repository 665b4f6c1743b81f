"""Worker and node faults injected into a real text_to_image job, for tests/test_worker_sigkill.py
and tests/test_node_loss.py (through tests/fault_runs.py).

Each scenario runs in its own process (``python -m tests.fault_scenarios SCENARIO MANIFEST OUTPUT``)
with its own Ray, so that killing workers or nodes cannot disturb the pytest process's Ray. The job
runs in a thread; the main thread waits for a condition (a worker running a given task, output
shards), injects the fault, waits for the job, and prints one JSON line: the job's stats and what was done.

Only processes below this one (the Ray it started) are ever looked at or killed: other Rays on the
machine run stage actors under the same titles.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import ray

import psutil  # isort: skip - the copy Ray ships (ray/thirdparty_files), importable once ray is

from pipeline.cluster import retry_local_start
from pipeline.job import run_job
from pipeline.spec import parse_spec
from tests.helpers import by_id, run_in_process

STAGE_ACTOR = "MapWorker(MapBatches(TextToImageStage))"
DEADLINE_S = 240  # generous: a condition that is not met by then is a failure, not a wait
# The stage options of each scenario (one CPU, one torch thread: the reference run in the test's
# process makes the same images with the same thread count, and no thread spins on a loaded machine).
STAGE_OPTIONS = {"worker_sigkill": {}, "node_loss": {"cpus_per_actor": 1}}
NODE_CPUS = 2  # the node-loss worker node's: the actor's and one for the CPU steps
REPLACEMENT_DELAY_S = 10  # how long a lost node's replacement takes to join (well under Ray Data's no-progress timeout)


def spec(manifest: str, output: str, **stage):
    """A small text_to_image job whose shards appear as rows finish (two rows a shard)."""
    return parse_spec({
        "manifest": manifest, "output": output, "format": {"rows_per_shard": 2},
        "stages": [{"kind": "text_to_image", "steps": 10, "width": 64, "height": 64, "batch_size": 2, **stage}],
    })


def reference(manifest: str, output: str, **stage) -> dict[str, str]:
    """{id: image_sha256} of the rows of ``spec(manifest, output, **stage)`` made without Ray and
    without faults: the same steps called in this process."""
    return by_id(run_in_process(spec(manifest, output, **stage)), "image_sha256")


def title(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()).strip()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def ray_workers(running: str) -> list[psutil.Process]:
    """Workers of this Ray running ``running``: Ray titles a worker "ray::TASK" while it runs a
    task ("ray::MapBatches(prepare_batch)", or fused steps joined by "->", of which ``running`` may
    be a run: "ray::ReadParquet->MapBatches(prepare_batch)->...") and "ray::ACTOR.METHOD" while an actor runs METHOD."""
    return [p for p in psutil.Process().children(recursive=True) if runs(title(p), running)]


def stage_actors(method: str) -> list[psutil.Process]:
    return ray_workers(f"{STAGE_ACTOR}.{method}")


def wait_for(what: str, condition, job: threading.Thread):
    deadline = time.monotonic() + DEADLINE_S
    while not (found := condition()):
        if not job.is_alive():
            raise RuntimeError(f"the job ended before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {DEADLINE_S} s")
        time.sleep(0.02)  # CPU tasks last a fraction of a second
    return found


def shards(output: str) -> list[Path]:
    return sorted(Path(output, "data").glob("*.parquet"))


class Job(threading.Thread):
    def __init__(self, spec):
        super().__init__(daemon=True)
        self.spec, self.stats, self.error = spec, None, None

    def run(self):
        try:
            self.stats = dataclasses.asdict(run_job(self.spec))  # JSON for the test
        except BaseException as err:  # noqa: BLE001 - reported to the test as the job's failure
            self.error = f"{type(err).__name__}: {err}"


def runs(proc_title: str, running: str) -> bool:
    """Whether a worker titled ``proc_title`` runs ``running`` (see ray_workers)."""
    return proc_title.startswith("ray::") and f"->{running}->" in f"->{proc_title.removeprefix('ray::')}->"


def kill_while(what: str, running: str, job: threading.Thread, also=lambda: True) -> dict:
    """SIGKILL a worker of this Ray while it runs ``running`` (once ``also()`` holds). Its title is
    read again just before the kill: a CPU task can end between the search and the kill (on a busy
    machine it did, and the kill hit an idle worker), and then another is waited for."""
    while True:
        proc = wait_for(what, lambda: also() and ray_workers(running), job)[0]
        seen = {"pid": proc.pid, "title": title(proc)}
        if runs(seen["title"], running):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            return seen


def worker_sigkill(manifest: str, output: str) -> dict:
    """SIGKILL one worker of each kind, in the order they come up: a task of the CPU prepare
    step, the stage actor while it loads its model (its constructor), the stage actor again while
    it runs a batch once some shards exist, and a task of the CPU encode-and-write step."""
    retry_local_start(lambda: ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False))
    try:
        job = Job(spec(manifest, output, **STAGE_OPTIONS["worker_sigkill"]))
        job.start()
        killed = {
            "prepare": kill_while("a prepare task", "MapBatches(prepare_batch)", job),
            "loading": kill_while("a stage actor loading", f"{STAGE_ACTOR}.__init__", job),
            "batch": kill_while("a stage actor in a batch after a shard", f"{STAGE_ACTOR}.submit", job,
                                also=lambda: shards(output)),
        }
        shards_at_kill = len(shards(output))
        killed["write"] = kill_while("a write task", "MapBatches(encode_batch)->Write", job)
        job.join()
        return {"stats": job.stats, "error": job.error, "killed": killed, "shards_at_kill": shards_at_kill}
    finally:
        ray.shutdown()


def raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def node_of(proc: psutil.Process, raylets: dict[int, str]) -> str | None:
    """The name of the node whose raylet (``raylets``: pid -> name) started ``proc``."""
    return next((raylets[p.pid] for p in proc.parents() if p.pid in raylets), None)


def node_loss(manifest: str, output: str) -> dict:
    """Lose the node that runs the stage actor (every process of it killed) mid-batch, after some
    shards exist. The head has no CPUs, so every CPU step (reading, prepare, encode and write) and
    the actor run on the worker node, and their blocks live in that node's memory; once it is gone
    nothing fits anywhere, and the job must wait: a replacement node joins REPLACEMENT_DELAY_S
    later, as an autoscaler or a node group would provide."""
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 0, "include_dashboard": False}
    cluster = retry_local_start(lambda: Cluster(initialize_head=True, head_node_args=head))
    head_address = cluster.gcs_address
    try:
        worker = retry_local_start(lambda: cluster.add_node(num_cpus=NODE_CPUS), clean_up=lambda: None)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        raylets = {raylet_pid(cluster.head_node): "head", raylet_pid(worker): "worker"}
        job = Job(spec(manifest, output, **STAGE_OPTIONS["node_loss"]))
        job.start()
        actor = wait_for("a stage actor in a batch after a shard",
                         lambda: shards(output) and stage_actors("submit"), job)[0]
        lost = {"pid": actor.pid, "title": title(actor), "node": node_of(actor, raylets),
                "shards_at_loss": len(shards(output))}
        # Where the CPU steps could run: the head offers none, so all of them ran on the lost node.
        cpus = {node["NodeID"]: node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]}
        lost["cpus"] = {"head": cpus.get(cluster.head_node.node_id), "worker": cpus.get(worker.node_id)}
        # A lost machine takes its workers with it; remove_node kills only the node's own
        # services (raylet, agents), and orphaned workers would linger a while.
        workers = psutil.Process(raylet_pid(worker)).children(recursive=True)
        cluster.remove_node(worker, allow_graceful=False)
        for proc in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(workers, timeout=30)
        shards_before = len(shards(output))
        time.sleep(REPLACEMENT_DELAY_S)
        waited = {"seconds": REPLACEMENT_DELAY_S, "job_alive": job.is_alive(), "shards_before": shards_before,
                  "shards_after": len(shards(output)), "stage_actors": len(stage_actors("submit"))}
        replacement = retry_local_start(lambda: cluster.add_node(num_cpus=NODE_CPUS), clean_up=lambda: None)
        raylets[raylet_pid(replacement)] = "replacement"
        restarted = wait_for("the stage actor restarted", lambda: stage_actors("submit"), job)[0]
        job.join()
        return {"stats": job.stats, "error": job.error, "lost": lost, "waited": waited,
                "restarted_on": node_of(restarted, raylets)}
    finally:
        ray.shutdown()
        cluster.shutdown()
        # Cluster() records its head as "the ray start of this machine" (/tmp/ray/ray_current_cluster);
        # left behind, it would send later runs without RAY_ADDRESS to a dead address.
        if ray._private.utils.read_ray_address() == head_address:
            os.remove(ray._private.utils.get_ray_address_file(None))


SCENARIOS = {"worker_sigkill": worker_sigkill, "node_loss": node_loss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("manifest")
    parser.add_argument("output")
    args = parser.parse_args()
    print(json.dumps(SCENARIOS[args.scenario](args.manifest, args.output)), flush=True)


if __name__ == "__main__":
    main()
