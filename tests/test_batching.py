"""How a stage cuts a batch into pipeline calls, in-process with the tiny SD model (no Ray): rows
with and without a negative prompt share calls, every call but a group's last is full, and a
call that runs out of memory halves the actor's batch size once for the rest of the job.

Out of memory cannot be caused for real on this CPU machine (no device memory limit; Python's
MemoryError comes from the whole process): a stage subclass raises torch's out-of-memory error
for calls over a row count, as a GPU does for a batch too large."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from pipeline.access import policy
from pipeline.prepare import prepare_batch
from pipeline.spec import AUTO_MAX_BATCH, AUTO_START_BATCH, LimitsSpec, StageSpec, StorageSpec
from pipeline.stages.text_to_image import TextToImageStage
from pipeline.tables import values

SPEC = dict(kind="text_to_image", model="builtin:tiny-sd", steps=1, width=32, height=32, batch_invariant=False)


class Fits(TextToImageStage):
    """Records each call's rows; a call of more than ``fits`` rows runs out of memory."""

    fits = 1 << 30

    def __init__(self, *args, **kwargs):
        self.calls: list[int] = []
        self.steps: list[int] = []
        super().__init__(*args, **kwargs)

    def generate(self, batch, rows):
        self.calls.append(len(rows))
        self.steps.append(self.param(batch, "steps", rows[0]))
        if len(rows) > self.fits:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory: {len(rows)} rows")
        return super().generate(batch, rows)


def prepared(stage, n: int, tmp_path, negatives=None) -> pa.Table:
    table = pa.table({"id": [f"r{i}" for i in range(n)], "prompt": [f"a red circle {i}" for i in range(n)],
                      "negative_prompt": negatives or [""] * n})
    access = policy(str(tmp_path / "manifest.parquet"), False, [])
    return prepare_batch(table, [stage.spec], StorageSpec(), access, LimitsSpec())


def test_rows_with_and_without_a_negative_prompt_share_full_calls(tmp_path):
    stage = Fits(StageSpec(**SPEC, batch_size=4))
    out = stage(prepared(stage, 10, tmp_path, ["", "blurry"] * 5))
    assert values(out, "status") == ["ok"] * 10
    assert stage.calls == [4, 4, 2]  # only the last call is short
    m = stage.metrics()
    assert (m.calls, m.call_rows, m.call_capacity) == (3, 10, 12)


def test_sd_encodes_a_missing_negative_prompt_as_the_empty_one(tmp_path):
    """What lets SD 1.x rows with and without a negative prompt share a call: diffusers encodes
    a row without one as "", so a mixed call gives each row the embeddings it gets alone."""
    stage = Fits(StageSpec(**SPEC, batch_size=4))
    mixed = stage.family.encode(stage.pipe, ["a", "b"], ["", "blurry"], "cpu", stage.spec)
    alone = stage.pipe.encode_prompt(["a"], "cpu", 1, True, None)[1]
    assert torch.equal(mixed["negative_prompt_embeds"][0], alone[0])


def test_an_out_of_memory_call_halves_the_batch_size_once_then_calls_are_full(tmp_path, capfd):
    stage = Fits(StageSpec(**SPEC, batch_size=8))
    stage.fits = 4
    out = stage(prepared(stage, 8, tmp_path))
    assert values(out, "status") == ["ok"] * 8
    assert stage.calls == [8, 4, 4]  # the failed call, then its rows at the new size
    stage(prepared(stage, 8, tmp_path))  # the next batch starts at the new size
    assert stage.calls[3:] == [4, 4]
    m = stage.metrics()
    assert (m.batch_size, m.batch_halvings) == (4, 1)
    said = capfd.readouterr().err
    assert said.count("ran out of memory") == 1 and "batch size is 4 for the rest of the job" in said


def test_a_row_that_runs_out_of_memory_alone_fails_alone(tmp_path):
    stage = Fits(StageSpec(**SPEC, batch_size=2))
    stage.fits = 0
    out = stage(prepared(stage, 2, tmp_path))
    assert values(out, "status") == ["error", "error"]
    assert all("out of memory for this row alone" in e for e in values(out, "error"))
    assert stage.calls == [2, 1, 1] and stage.metrics().batch_size == 1


@pytest.mark.parametrize("fits, probed", [(5, 4), (AUTO_MAX_BATCH * 2, AUTO_MAX_BATCH), (0, 1)])
def test_auto_batch_size_probes_for_the_largest_that_fits_on_a_gpu(fits, probed):
    """The probe's logic, on this CPU: an actor on a GPU doubles a one-step call from one row
    until it runs out of memory or reaches AUTO_MAX_BATCH (the calls stand in for the GPU's)."""
    stage = Fits(StageSpec(**{**SPEC, "steps": 3}))
    assert stage.batch_size == AUTO_START_BATCH and stage.calls == []  # a CPU actor does not probe
    calls = []

    def on_a_gpu(batch, rows):
        calls.append((len(rows), stage.param(batch, "steps", rows[0])))
        if len(rows) > fits:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory: {len(rows)} rows")

    stage.device, stage.generate = "cuda", on_a_gpu
    assert stage._batch_size() == probed
    assert stage.metrics().probed_batch_size == probed
    sizes = [n for n, _ in calls]
    assert sizes == [2**k for k in range(len(sizes))] and sizes[-1] in (probed, 2 * probed)
    assert {steps for _, steps in calls} == {1} and stage.spec.steps == 3  # one-step calls; its own steps after
