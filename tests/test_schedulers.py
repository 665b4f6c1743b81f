"""Every `scheduler:` choice runs and records its class: the same text_to_image stage with each
scheduler (and with none, which keeps the model's), fed the same prompt and seed, its row
prepared, generated and encoded as a job's are (in this process: the choice is the stage's)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.access import policy
from pipeline.encode import encode_batch
from pipeline.output_schema import to_output_table
from pipeline.prepare import prepare_batch
from pipeline.spec import FormatSpec, LimitsSpec, SchedulerName, StageSpec, StorageSpec
from pipeline.stages.text_to_image import TextToImageStage

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
FLOWS = {name.replace("+", "p"): name for name in CLASSES} | {"own": None}


def test_every_choice_is_listed():
    assert set(CLASSES) == set(SchedulerName.__args__)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """{choice: output row}"""
    access = policy(str(tmp_path_factory.mktemp("schedulers") / "m.parquet"), False, [])  # no URIs read
    out = {}
    for flow, scheduler in FLOWS.items():
        spec = StageSpec(kind="text_to_image", model="builtin:tiny-sd", steps=4, width=32, height=32,
                         scheduler=scheduler)
        row = pa.table({"id": [flow], "prompt": ["a red circle on a blue background"], "seed": [7]})
        prepared = prepare_batch(row, [spec], StorageSpec(), access, LimitsSpec())
        out[flow] = to_output_table(encode_batch(TextToImageStage(spec)(prepared), FormatSpec())).to_pylist()[0]
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
