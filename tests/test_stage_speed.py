"""The GPU loop's pieces, run on this CPU with the tiny SD model: the tuned pipeline (channels_last,
fused QKV projections) and the compiled one (`compile: true`) give the plain pipeline's images
(PSNR over 40 dB: other kernels may round differently), compiled calls keep one batch shape,
the conversion to uint8 on the device is diffusers' own, and each actor reports its figures."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pytest
import torch
from diffusers import StableDiffusionPipeline

from pipeline.access import policy
from pipeline.gpubench import psnr
from pipeline.models.resolve import resolve
from pipeline.prepare import prepare_batch
from pipeline.spec import LimitsSpec, StageSpec, StorageSpec
from pipeline.stages import speed
from pipeline.stages.base import to_uint8
from pipeline.stages.generators import row_generator
from pipeline.stages.text_to_image import TextToImageStage
from pipeline.tables import raw_images, values

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
SIZE = dict(width=32, height=32)


def plain_images(pipe, seeds: list[int]) -> list[np.ndarray]:
    """What a user's loop gets: diffusers' numpy output, rounded as diffusers rounds it."""
    out = pipe(PROMPTS, num_inference_steps=2, guidance_scale=7.5, output_type="np", **SIZE,
               generator=[row_generator(s) for s in seeds])
    return [to_uint8(image) for image in out.images]


def load():
    pipe = StableDiffusionPipeline.from_pretrained(resolve("builtin:tiny-sd"), use_safetensors=True,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prepared(stage, prompts: list[str], tmp_path) -> pa.Table:
    """A batch as the prepare step hands it to ``stage`` (its per-row parameters from its spec)."""
    table = pa.table({"id": [f"r{i}" for i in range(len(prompts))], "prompt": prompts})
    access = policy(str(tmp_path / "manifest.parquet"), False, [])  # no row reads a URI
    return prepare_batch(table, [stage.spec], StorageSpec(), access, LimitsSpec())


def stage_images(stage, tmp_path) -> tuple[list[np.ndarray], list[int]]:
    out = stage(prepared(stage, PROMPTS, tmp_path))
    assert values(out, "status") == ["ok"] * 3, values(out, "error")
    return raw_images(out), values(out, "seed")


def test_stage_images_are_the_plain_loops_bit_for_bit(tmp_path):
    """The stage quantises on the device (torch); a user's loop through numpy: the same pixels."""
    stage = TextToImageStage(StageSpec(kind="text_to_image", model="builtin:tiny-sd", steps=2, guidance_scale=7.5,
                                       batch_size=3, batch_invariant=False, **SIZE))
    images, seeds = stage_images(stage, tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(images, plain_images(load(), seeds)))


def test_tuned_pipeline_gives_the_same_images():
    seeds = [1, 2, 3]
    plain, tuned = load(), load()
    assert speed.tune(tuned) == ["unet:channels_last", "vae:channels_last", "fused_qkv"]
    assert tuned.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert min(psnr(a, b) for a, b in zip(plain_images(plain, seeds), plain_images(tuned, seeds))) > 40


def test_compiled_stage_pads_calls_to_one_shape_and_gives_the_same_images(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDGEN_CACHE", str(tmp_path / "cache"))
    spec = dict(kind="text_to_image", model="builtin:tiny-sd", steps=2, guidance_scale=7.5, batch_size=4,
                batch_invariant=False, **SIZE)
    compiled = TextToImageStage(StageSpec(**spec, compile=True))
    assert isinstance(compiled.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert "vae.decode:compiled" in compiled.tuned
    shapes = []
    compiled.pipe.unet.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    images, seeds = stage_images(compiled, tmp_path)  # 3 rows, padded to the batch of 4
    assert set(shapes) == {(8, 4, 8, 8)}  # 4 rows x (prompt, negative), 4 latent channels, 32 / 4
    assert compiled.metrics().load_s > 0  # the warm-up ran inside the constructor
    plain = stage_images(TextToImageStage(StageSpec(**spec)), tmp_path)[0]
    assert min(psnr(a, b) for a, b in zip(images, plain)) > 40


def test_each_actor_reports_where_its_time_went(tmp_path):
    stage = TextToImageStage(StageSpec(kind="text_to_image", model="builtin:tiny-sd", steps=2, **SIZE))
    before = stage.metrics()
    assert before.load_s > 0 and before.batches == 0 and before.first_image_s is None
    stage(prepared(stage, PROMPTS, tmp_path))
    time.sleep(0.3)  # no input for a while
    stage(prepared(stage, PROMPTS[:1], tmp_path))
    m = stage.metrics()
    assert (m.batches, m.rows) == (2, 4)
    assert m.load_s < m.first_image_s and m.pipeline_s > 0 and m.wait_s >= 0.3
    assert m.gpu_busy is None and m.peak_gpu_memory_gb is None  # a CPU actor has no GPU to sample


@pytest.mark.parametrize("finite", [True, False])
def test_a_non_finite_image_is_none(finite, tmp_path):
    stage = TextToImageStage(StageSpec(kind="text_to_image", model="builtin:tiny-sd", steps=2, **SIZE))
    images = torch.rand(2, 3, 4, 4)
    if not finite:
        images[1, 0, 0, 0] = float("nan")
    out = stage.to_images(images, {}, [0, 1])
    assert out[0].dtype == np.uint8 and out[0].shape == (4, 4, 3)
    assert (out[1] is None) is not finite
