"""A fault while generating one row (out of memory, any exception, a NaN output) makes that row an
error row naming the stage and the kind; its neighbours in the batch go on and the stage keeps
working.

Out-of-memory cannot be caused for real on a CPU machine: a stage subclass raises it for rows
whose prompt asks for it, in a plain in-process stage call (no Ray). A NaN output is caused for
real: a copy of builtin:tiny-sd whose text encoder maps one word to NaN, with good rows in the
same pipeline call. Bad inputs are caused for real in test_bad_manifests.py.
"""

from __future__ import annotations

import shutil
import weakref

import diffusers
import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.access import policy
from pipeline.models.resolve import resolve
from pipeline.prepare import prepare_batch
from pipeline.spec import LimitsSpec, StageSpec, StorageSpec
from pipeline.stages.text_to_image import TextToImageStage
from pipeline.tables import values


class _Held:
    """Stands for the tensors a failed call leaves in its frames."""


class FaultyStage(TextToImageStage):
    """Raises CUDA out-of-memory for a call with an "OOM" row, MemoryError for a "RAM" row."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[list[str]] = []
        self.held: weakref.ref | None = None
        self.freed_before_next_call: list[bool] = []

    def generate(self, batch, rows):
        if self.held is not None:
            self.freed_before_next_call.append(self.held() is None)
            self.held = None
        prompts = [batch["prompt"][i] for i in rows]
        self.calls.append(prompts)
        held = _Held()
        if any("OOM" in p for p in prompts):
            self.held = weakref.ref(held)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        if any("RAM" in p for p in prompts):
            raise MemoryError()
        return super().generate(batch, rows)


@pytest.fixture(scope="module")
def loaded_stage():
    # batch_invariant off: the whole batch goes in one call, as on a GPU, so a fault hits every row of it.
    spec = StageSpec(kind="text_to_image", model="builtin:tiny-sd", steps=2, width=32, height=32,
                     batch_invariant=False)
    return FaultyStage(spec, StorageSpec())


@pytest.fixture
def stage(loaded_stage):
    """The module's stage (its model loaded once) with a fresh record of calls for each test."""
    loaded_stage.calls, loaded_stage.held, loaded_stage.freed_before_next_call = [], None, []
    loaded_stage.batch_size = loaded_stage._batch_size()  # as it starts: an earlier test's halvings undone
    return loaded_stage


def prepared(prompts: list[str], tmp_path) -> pa.Table:
    table = pa.table({"id": [f"r{i}" for i in range(len(prompts))], "prompt": prompts})
    spec = StageSpec(kind="text_to_image", steps=2, width=32, height=32)
    access = policy(str(tmp_path / "manifest.parquet"), False, [])  # no row reads a URI
    return prepare_batch(table, [spec], StorageSpec(), access, LimitsSpec())


def test_out_of_memory_fails_its_row_alone(stage, tmp_path):
    prompts = ["a red circle", "OOM a blue square", "a green star", "RAM a yellow ring"]
    out = stage(prepared(prompts, tmp_path))
    status, error = values(out, "status"), values(out, "error")
    assert status == ["ok", "error", "ok", "error"], error
    assert error[1].startswith("text_to_image: OutOfMemoryError: CUDA out of memory. Tried to allocate 64.00 GiB")
    assert error[3].startswith("text_to_image: MemoryError: ")
    assert all("out of memory for this row alone" in error[i] for i in (1, 3))
    assert all(len(pixels) == 32 * 32 * 3 for pixels in values(out, "_sg_pixels")[::2])
    # The failed batch call, then its halves (out of memory halves the batch size), then each row
    # alone where a half failed too.
    assert stage.calls == [prompts, prompts[:2], prompts[:1], prompts[1:2], prompts[2:3], prompts[3:]]
    # The retries ran after the failed call's frames were released (what a GPU needs to free memory).
    assert stage.freed_before_next_call and all(stage.freed_before_next_call)


def test_stage_keeps_working_after_a_fault_with_the_model_it_loaded(stage, tmp_path, monkeypatch):
    """The actor keeps its model: no pipeline is loaded again after a faulted row (a load counted
    on the pipeline class), and the stage's pipeline is the very object it loaded at start."""
    loads = []
    pipeline_class = getattr(diffusers, stage.pipeline_class)
    real = pipeline_class.from_pretrained.__func__
    monkeypatch.setattr(pipeline_class, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k)))
    pipe = stage.pipe
    stage(prepared(["OOM", "RAM"], tmp_path))
    out = stage(prepared(["a red circle", "a blue square"], tmp_path))
    assert values(out, "status") == ["ok", "ok"] and values(out, "error") == [None, None]
    assert stage.pipe is pipe and loads == []


POISON = "purple"


@pytest.fixture(scope="module")
def poisoned_model(tmp_path_factory):
    """builtin:tiny-sd whose text encoder embeds the word "purple" as NaN: a real model in which a
    prompt with that word makes a NaN image, while other prompts in the same call are untouched."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("poisoned") / "tiny-sd"
    shutil.copytree(resolve("builtin:tiny-sd"), folder)
    (token,) = CLIPTokenizer.from_pretrained(folder / "tokenizer")(POISON, add_special_tokens=False).input_ids
    weights_file = folder / "text_encoder" / "model.safetensors"
    weights = load_file(weights_file)
    embedding = next(name for name in weights if name.endswith("token_embedding.weight"))
    weights[embedding][token] = float("nan")
    save_file(weights, weights_file, metadata={"format": "pt"})
    return str(folder)


def test_nan_row_in_a_shared_call_fails_alone(poisoned_model, tmp_path):
    """Four rows of one group (same steps, guidance and size) in one pipeline call; the one whose
    prompt hits the poisoned word is an error row, the others are the images each makes alone."""
    prompts = ["a red circle", f"a {POISON} square", "a green star", "a blue ring"]
    spec = dict(kind="text_to_image", model=poisoned_model, steps=2, width=32, height=32)
    batched = TextToImageStage(StageSpec(**spec, batch_invariant=False), StorageSpec())
    alone = TextToImageStage(StageSpec(**spec, batch_invariant=True), StorageSpec())
    out, reference = batched(prepared(prompts, tmp_path)), alone(prepared(prompts, tmp_path))
    status, error = values(out, "status"), values(out, "error")
    assert status == ["ok", "error", "ok", "ok"], error
    assert error[1] == "text_to_image: output is not finite (NaN or inf)"
    for i in (0, 2, 3):
        image = np.frombuffer(values(out, "_sg_pixels")[i], np.uint8).astype(np.int16)
        own = np.frombuffer(values(reference, "_sg_pixels")[i], np.uint8).astype(np.int16)
        assert len(image) == 32 * 32 * 3 and image.std() > 0
        assert np.abs(image - own).max() <= 16, i  # the row's own picture, up to batch rounding
