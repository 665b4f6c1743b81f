"""The per-stage speed choices (attention_backend, cache, compile: regional) and what they do,
in-process on tiny models (no Ray): a choice the model's denoiser cannot take is refused before
any actor starts, naming the field; an attention backend keeps the images within rounding; a
first-block cache skips the transformer's later blocks on steps where the first changed little;
SDXL rows with and without a negative prompt share a call and get the embeddings they get alone."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from pipeline.access import policy
from pipeline.errors import ModelError
from pipeline.families import FAMILIES, check_family
from pipeline.gpubench import psnr
from pipeline.models.resolve import resolve
from pipeline.prepare import prepare_batch
from pipeline.spec import LimitsSpec, StageSpec, StorageSpec
from pipeline.stages.text_to_image import TextToImageStage
from pipeline.tables import raw_images, values
from tests import tiny_pipelines

SPEC = dict(kind="text_to_image", steps=4, width=32, height=32, batch_invariant=False, batch_size=2)
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("flux") / "flux"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tiny_pipelines.flux().save_pretrained(folder, safe_serialization=True)
    return str(folder)


def index(model: str) -> dict:
    return json.loads((Path(resolve(model)) / "model_index.json").read_text())


@pytest.mark.parametrize("choice, message", [
    ({"attention_backend": "native"}, "attention_backend: the model's denoiser (UNet2DConditionModel) does not route"),
    ({"cache": {"threshold": 0.1}}, "cache: the model's denoiser (UNet2DConditionModel) takes no diffusers cache"),
])
def test_a_choice_the_denoiser_cannot_take_is_refused_naming_the_field(choice, message):
    stage = StageSpec(**SPEC, model="builtin:tiny-sd", **choice)
    with pytest.raises(ModelError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        check_family(stage.model, index(stage.model), stage)


def test_an_unknown_attention_backend_is_refused_with_the_known_ones(flux):
    stage = StageSpec(**SPEC, model=flux, attention_backend="fastest")
    with pytest.raises(ModelError, match=r"^attention_backend: 'fastest' is not one of diffusers' backends .*'flash'"):
        check_family(stage.model, index(stage.model), stage)


def test_regional_compile_is_taken_by_unets_and_flux(flux):
    for model in ("builtin:tiny-sd", flux):
        stage = StageSpec(**SPEC, model=model, compile="regional")
        assert check_family(stage.model, index(stage.model), stage)


def images(stage, tmp_path) -> list:
    table = pa.table({"id": [f"r{i}" for i in range(len(PROMPTS))], "prompt": PROMPTS})
    access = policy(str(tmp_path / "manifest.parquet"), False, [])
    out = stage(prepare_batch(table, [stage.spec], StorageSpec(), access, LimitsSpec()))
    assert values(out, "status") == ["ok"] * len(PROMPTS), values(out, "error")
    return raw_images(out)


def blocks_run(stage) -> list[int]:
    """Counts the runs of the transformer's last block (its output projection: a skipped block's
    own call still happens, the cache answers it)."""
    calls = []
    stage.pipe.transformer.single_transformer_blocks[-1].proj_out.register_forward_pre_hook(
        lambda *_: calls.append(1))
    return calls


def test_attention_backend_and_cache_apply_to_flux(flux, tmp_path):
    plain = TextToImageStage(StageSpec(**SPEC, model=flux))
    backend = TextToImageStage(StageSpec(**SPEC, model=flux, attention_backend="_native_math"))
    cached = TextToImageStage(StageSpec(**SPEC, model=flux, cache={"threshold": 1.0}))
    assert "attention:_native_math" in backend.tuned and "cache:first_block@1" in cached.tuned
    plain_runs, cached_runs = blocks_run(plain), blocks_run(cached)
    reference = images(plain, tmp_path)
    assert min(psnr(a, b) for a, b in zip(reference, images(backend, tmp_path))) > 40
    images(cached, tmp_path)
    # Uncached: every block each step. Cached at the highest threshold: the first step runs the
    # whole transformer, the later steps only its first block.
    assert len(plain_runs) == SPEC["steps"] and len(cached_runs) == 1


def test_sdxl_rows_with_and_without_a_negative_prompt_get_their_own_embeddings(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = tiny_pipelines.sdxl()
    encode = next(f for f in FAMILIES if f.name == "sdxl").encode
    mixed = encode(pipe, ["a", "b"], ["", "blurry"], "cpu", None)
    without = encode(pipe, ["a"], [""], "cpu", None)
    with_one = encode(pipe, ["b"], ["blurry"], "cpu", None)
    for name in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
        assert torch.allclose(mixed[name][0], without[name][0], atol=1e-6)
        assert torch.allclose(mixed[name][1], with_one[name][0], atol=1e-5)
