"""With `flows`, each flow's branch of the plan reads the manifest, streamed, and takes its own rows
before they are batched, so that every pipeline call but a stage's last is full; no branch holds
the read manifest in the object store (a 100M-row manifest would not fit)."""

from __future__ import annotations

import pyarrow as pa
import ray

from pipeline import plan
from pipeline.done_ids import DoneIds
from pipeline.job import run_job, summary_line
from pipeline.spec import parse_spec
from pipeline.tracker import JobTracker
from tests.helpers import read_output, write_manifest


def test_each_flow_streams_its_own_read(tmp_path, ray_local, capsys):
    manifest = write_manifest(str(tmp_path / "m.parquet"), [
        {"id": "a", "task": "t2i", "prompt": "a red circle"},
        {"id": "b", "task": "sr", "prompt": ""},
        {"id": "c", "task": "nowhere", "prompt": "x"},
    ])
    stage = {"steps": 2, "cpus_per_actor": 0.25}
    spec = parse_spec({"manifest": manifest, "output": str(tmp_path / "out"),
                       "flows": {"t2i": [{"kind": "text_to_image", "width": 32, "height": 32, **stage}],
                                 "sr": [{"kind": "super_resolution", **stage}]}})
    job = JobTracker.remote()
    try:
        plan.build(plan.fit_resources(spec, 2, 0, 2), 3, DoneIds(pa.array([], pa.string())), job).explain()
    finally:
        ray.kill(job)
    physical = capsys.readouterr().out.split("-------- Physical Plan (Optimized) --------")[1]
    # A read per flow and one for the rows of no flow, each streamed into its branch (a
    # materialized read shows no read in the plan: its rows are already held).
    assert physical.count("ReadParquet") == 3 and physical.count("UnionOperator[") == 1, physical
    # Each flow's rows are cut in a step of their own, then again fused into prepare.
    assert physical.count("StreamingRepartition") == 4, physical


def test_each_flow_s_calls_are_full(tmp_path, ray_local):
    """Two flows, rows of each interleaved, half of them with a negative prompt, and one row of no
    flow: every call of every stage is a full batch (batch_invariant off, as on GPUs)."""
    rows = [{"id": f"r{i:02d}", "task": "ab"[i % 2], "prompt": f"a red circle {i}",
             "negative_prompt": "blurry" if (i // 2) % 2 else ""} for i in range(48)]
    manifest = write_manifest(str(tmp_path / "m.parquet"), [*rows, {"id": "x", "task": "c", "prompt": "x",
                                                                     "negative_prompt": ""}])
    stage = {"kind": "text_to_image", "model": "builtin:tiny-sd", "steps": 1, "width": 32, "height": 32,
             "batch_size": 8, "batch_invariant": False, "cpus_per_actor": 0.5}
    spec = parse_spec({"manifest": manifest, "output": str(tmp_path / "out"),
                       "flows": {"a": [stage], "b": [{**stage, "guidance_scale": 5.0}]}})
    stats = run_job(spec, log=lambda _: None)
    assert (stats.ok, stats.error) == (48, 1)
    [t2i] = stats.stages
    assert (t2i.calls, t2i.call_rows, t2i.fill, t2i.batch_size) == (6, 48, 1.0, 8)
    assert "48 rows in 6 calls (fill 100%)" in summary_line(spec, stats)
    errors = {r["id"]: r["error"] for r in read_output(spec.output).to_pylist() if r["status"] == "error"}
    assert list(errors) == ["x"] and "'c' is not a flow of this job" in errors["x"]
