"""The tiny pipelines of tests/tiny_families.py and the text encoders of tests/tiny_text_encoders.py:
each family saves, loads back as its own pipeline class and generates, in process (no Ray)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline
from transformers import AutoTokenizer

from pipeline.models.tokenizer import WORDS
from tests import tiny_text_encoders
from tests.helpers import built_once
from tests.tiny_families import FAMILY_BUILDERS

# What each builder must save, written out here rather than read from the builders.
PIPELINE_CLASS = {
    "flux2-klein": "Flux2KleinPipeline",
    "qwen-image": "QwenImagePipeline",
    "z-image": "ZImagePipeline",
    "sana": "SanaPipeline",
    "chroma": "ChromaPipeline",
    "aura-flow": "AuraFlowPipeline",
    "lumina2": "Lumina2Pipeline",
    "cogview4": "CogView4Pipeline",
}
# SANA bins the asked size to its nearest 1024-px aspect ratio, generates that and resizes back: on
# the tiny model 32x32 costs 17 s that way instead of under 1 s.
CALL_ARGS = {"sana": {"use_resolution_binning": False}}
PROMPTS = ["a red circle", "a blue square on a green background"]


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory):
    return built_once(FAMILY_BUILDERS, tmp_path_factory)


def test_registry_names_each_family_once():
    assert set(FAMILY_BUILDERS) == set(PIPELINE_CLASS)


@pytest.mark.parametrize("name", sorted(PIPELINE_CLASS))
def test_family_saves_loads_and_generates(name, family_folder):
    folder = family_folder(name)
    weights = {p.suffix for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt")}
    assert weights == {".safetensors"}

    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == PIPELINE_CLASS[name]
    generators = [torch.Generator().manual_seed(seed) for seed in range(len(PROMPTS))]
    images = pipe(prompt=PROMPTS, num_inference_steps=2, height=32, width=32, output_type="pt",
                  generator=generators, **CALL_ARGS.get(name, {})).images

    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    # Random weights still map prompt and noise to an image: not a constant, and not one image twice.
    assert images.std() > 0.01
    assert not torch.allclose(images[0], images[1])


ENCODERS = ["qwen3", "qwen2_5_vl", "gemma2", "glm", "llama", "bert", "umt5", "byt5"]


@pytest.mark.parametrize("name", ENCODERS)
def test_text_encoder_reads_any_prompt_and_reloads(name, tmp_path):
    torch.manual_seed(0)
    model, tokenizer = getattr(tiny_text_encoders, name)()
    prompts = ["a red circle on a blue background", "Zürich, 東京 & ☃ at 3:45"]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True).hidden_states[-1]
    assert hidden.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(hidden).all()

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(prompts)["input_ids"] == tokenizer(prompts)["input_ids"]


@pytest.mark.parametrize("name", ["qwen3", "glm", "llama"])
def test_byte_level_bpe_keeps_words_whole_and_loses_no_byte(name):
    _, tokenizer = getattr(tiny_text_encoders, name)()
    pieces = tokenizer.tokenize("a red circle on a blue background")
    assert pieces == ["a", "Ġred", "Ġcircle", "Ġon", "Ġa", "Ġblue", "Ġbackground"]
    text = "Zürich, 東京 & ☃ at 3:45"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_gemma_tokenizer_falls_back_to_bytes():
    tokenizer = tiny_text_encoders.gemma_tokenizer()
    assert tokenizer.tokenize("a red circle") == ["a", "▁red", "▁circle"]
    text = "Zürich 東京"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_bert_wordpiece_has_every_shapes_word():
    tokenizer = tiny_text_encoders.bert_tokenizer()
    assert all(tokenizer.tokenize(word) == [word] for word in WORDS)
    assert tokenizer.tokenize("zebra") == ["z", "##e", "##b", "##r", "##a"]


def test_qwen_chat_template_turns_thinking_off_as_qwen3_does():
    tokenizer = tiny_text_encoders.qwen_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "a red circle"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
