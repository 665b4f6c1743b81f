"""Every `scheduler:` choice runs and records its class: one job whose flows are the same
text_to_image stage with each scheduler (and one with none, which keeps the model's), fed the
same prompt and seed."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.job import run_job
from pipeline.spec import SchedulerName, parse_spec
from tests.conftest import read_output, write_manifest

CLASSES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
MODEL_OWN = "DPMSolverMultistepScheduler"  # builtin:tiny-sd's saved scheduler
# One flow per choice; flow names are plain words.
FLOWS = {name.replace("+", "p"): name for name in CLASSES} | {"own": None}


def test_every_choice_is_listed():
    assert set(CLASSES) == set(SchedulerName.__args__)


@pytest.fixture(scope="module")
def rows(tmp_path_factory, ray_local):
    """{flow: output row}: two jobs of four flows each (a pool per flow; eight pools at once are
    more than the CPU steps leave room for on this 2-CPU test cluster)."""
    folder = tmp_path_factory.mktemp("schedulers")
    stage = {"kind": "text_to_image", "model": "builtin:tiny-sd", "steps": 4, "width": 32, "height": 32,
             "cpus_per_actor": 0.25}
    names, out = list(FLOWS), {}
    for part, flows in enumerate((names[:4], names[4:])):
        manifest = write_manifest(str(folder / f"m{part}.parquet"), pa.Table.from_pylist(
            [{"id": flow, "task": flow, "prompt": "a red circle on a blue background", "seed": 7} for flow in flows]))
        output = str(folder / f"out{part}")
        spec = parse_spec({"manifest": manifest, "output": output,
                           "flows": {flow: [{**stage, "scheduler": FLOWS[flow]}] for flow in flows}})
        stats = run_job(spec, log=lambda _: None)
        assert (stats.rows, stats.error) == (len(flows), 0), stats.errors_by_kind
        out.update({r["id"]: r for r in read_output(output).to_pylist()})
    return out


@pytest.mark.parametrize("flow", list(FLOWS))
def test_each_scheduler_runs_and_records_its_class(rows, flow):
    row = rows[flow]
    expected = CLASSES[FLOWS[flow]] if FLOWS[flow] else MODEL_OWN
    assert row["status"] == "ok", row["error"]
    assert row["scheduler"] == expected
    assert json.loads(row["stage_params"])[0]["scheduler"] == expected
    image = Image.open(io.BytesIO(row["image"]["bytes"]))
    assert image.size == (32, 32)


def test_the_scheduler_is_the_one_used(rows):
    """Same prompt, seed and steps: dpm++ is the model's own class and config, so the same image;
    every other scheduler draws another."""
    own = rows["own"]["image_sha256"]
    assert rows["dpmpp"]["image_sha256"] == own
    others = {flow: rows[flow]["image_sha256"] for flow in FLOWS if flow not in ("own", "dpmpp")}
    assert all(digest != own for digest in others.values()), others
    pixels = {flow: np.asarray(Image.open(io.BytesIO(rows[flow]["image"]["bytes"]))) for flow in FLOWS}
    assert all(pixels[flow].std() > 0 for flow in FLOWS)  # a picture, not a flat fill
