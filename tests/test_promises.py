"""README and docs promises proven in this process, each by a test that fails when the promise
breaks: no Ray job, no subprocess (the stand-in Hub is the only server)."""

from __future__ import annotations

import json
import os
import warnings
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
import yaml

from pipeline import job_record, layout, submit
from pipeline.models.hub import select
from pipeline.spec import LimitsSpec, StageSpec, parse_spec
from tests.helpers import cli, cli_output

# -- limits: every super_resolution stage is checked at x4 (docs/reference.md) ---------------------


def test_latent_x2_upscaler_is_checked_at_x4():
    """A 600x600 input to the latent x2 upscaler makes 1200x1200, within the limits; the limits are
    checked at x4 (2400x2400) as for every super_resolution stage, so the row is refused."""
    stage = StageSpec(kind="super_resolution", model="stabilityai/sd-x2-latent-upscaler")
    problem = LimitsSpec().flow_problem([stage], 600, 600)
    assert problem == "super_resolution makes 2400x2400: width 2400 is over limits.max_width 2048"
    assert LimitsSpec().flow_problem([stage], 512, 512) is None  # 2048x2048: at the limits


# -- _job.json: when the run started and ended -----------------------------------------------------


def test_job_file_records_start_then_end(tmp_path):
    """Written at the start with ended_at null, and again at the end with both times as given."""
    spec = parse_spec({"manifest": str(tmp_path / "m.parquet"), "output": str(tmp_path / "out"),
                       "stages": [{"kind": "text_to_image"}]})
    started = datetime(2026, 5, 1, 22, 0, 5, tzinfo=timezone.utc)
    ended = started + timedelta(minutes=7, seconds=3)
    (tmp_path / "out").mkdir()
    job_record.write_job_file(spec, "run-a", started)
    at_start = json.loads((tmp_path / "out" / layout.JOB).read_text())
    assert (at_start["started_at"], at_start["ended_at"]) == ("2026-05-01T22:00:05+00:00", None)
    job_record.write_job_file(spec, "run-a", started, ended, ["run-0", "run-a"])
    at_end = json.loads((tmp_path / "out" / layout.JOB).read_text())
    assert (at_end["started_at"], at_end["ended_at"]) == ("2026-05-01T22:00:05+00:00", "2026-05-01T22:07:08+00:00")
    assert (at_end["run_id"], at_end["runs"]) == ("run-a", ["run-0", "run-a"])


# -- the Hub: a component without the variant falls back to its plain weights ------------------------


def test_variant_falls_back_to_plain_weights_per_component():
    """diffusers' rule: the variant's weights where a component has them, the plain ones where it
    has none of that variant (here the vae), never both."""
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    files = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
             "vae/diffusion_pytorch_model.safetensors"]
    assert select(files, index, "fp16") == ["model_index.json", "unet/config.json",
                                            "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
                                            "vae/diffusion_pytorch_model.safetensors"]


# -- --verbose ---------------------------------------------------------------------------------------


QUIETED = ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")


@pytest.mark.parametrize("flags, quiet", [((), True), (("--verbose",), False)])
def test_verbose_leaves_the_libraries_talking(tmp_path, monkeypatch, flags, quiet):
    """Without --verbose the libraries' notices are silenced (here and in the workers, through the
    environment); with it they are left as they are. A missing manifest stops the run before Ray."""
    for name in QUIETED:
        monkeypatch.delenv(name, raising=False)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"manifest": str(tmp_path / "missing.parquet"), "output": str(tmp_path / "out"),
                                    "stages": [{"kind": "text_to_image"}]}))
    with warnings.catch_warnings():  # quiet_libraries adds warning filters: keep them out of other tests
        code, _, err = cli("run", "--spec", str(spec), *flags)
    assert code == 2 and "missing.parquet" in err, err
    assert [os.environ.get(name) for name in QUIETED] == (["error", "error", "1"] if quiet else [None] * 3)


# -- nightly: a night whose attempt has not ended is `running`, and not a failure ------------------------


class _Cluster:
    """The Jobs API of a cluster on which the night's first attempt is still running (a stand-in:
    a running job on a real cluster would need a Ray job of its own)."""

    def __init__(self, running_id: str):
        from ray.job_submission import JobStatus

        self.jobs = [SimpleNamespace(submission_id=running_id, status=JobStatus.RUNNING)]

    def list_jobs(self):
        return self.jobs

    def submit_job(self, **kwargs):
        raise AssertionError(f"a night whose attempt runs was submitted again: {kwargs['submission_id']}")


def test_nightly_night_still_running_is_listed_running_and_exits_0(tmp_path, monkeypatch):
    spec = tmp_path / "nightly.yaml"
    spec.write_text(yaml.safe_dump({"manifest": str(tmp_path / "m-{date}.parquet"), "output": str(tmp_path / "n")}))
    _, (night,) = submit.load_nights(str(spec), [datetime(2026, 5, 1).date()])
    running = f"{submit.base_id(str(spec), night)}-a1"
    monkeypatch.setattr(submit, "client", lambda address: _Cluster(running))
    code, out = cli_output("nightly", "--spec", str(spec), "--from", "2026-05-01", "--to", "2026-05-01",
                           "--address", "http://127.0.0.1:8265")
    row = next(line for line in out.splitlines() if line.startswith("2026-05-01"))
    assert row.split()[1] == "running" and f"already on the cluster as {running}" in row, out
    assert code == 0, out
