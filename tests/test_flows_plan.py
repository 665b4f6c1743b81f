"""With `flows`, the job reads the manifest once: one read feeds every flow's stages (Ray Data
would read it again for each branch of a plan that splits the dataset per flow)."""

from __future__ import annotations

import pyarrow as pa
import ray

from pipeline import plan
from pipeline.spec import parse_spec
from pipeline.tracker import JobTracker
from tests.conftest import write_manifest


def test_two_flows_read_the_manifest_once(tmp_path, ray_local, capsys):
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
        plan.build(plan.fit_resources(spec, 2, 0, 2), 3, pa.array([], pa.string()), job).explain()
    finally:
        ray.kill(job)
    physical = capsys.readouterr().out.split("-------- Physical Plan (Optimized) --------")[1]
    assert physical.count("ReadParquet") == 1, physical
