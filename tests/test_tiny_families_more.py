"""The tiny pipelines of tests/tiny_families_more.py: each family saves, loads back as its own pipeline
class and generates an image of the asked size, in process (no Ray); the safety checker flags every
image through its own scoring; the two DeepFloyd IF stages encode prompts alike."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from pipeline.stages.base import register_wuerstchen_module
from tests.helpers import built_once
from tests.tiny_families_more import MORE_BUILDERS

# What each builder must save, written out here rather than read from the builders.
PIPELINE_CLASS = {
    "if-stage-1": "IFPipeline",
    "if-stage-2": "IFSuperResolutionPipeline",
    "sd-flag-everything": "StableDiffusionPipeline",
    "flux-kontext": "FluxKontextPipeline",
    "hunyuan-dit": "HunyuanDiTPipeline",
    "kandinsky3": "Kandinsky3Pipeline",
    "stable-cascade": "StableCascadeCombinedPipeline",
    "wuerstchen": "WuerstchenCombinedPipeline",
    "kolors": "KolorsPipeline",
    "hidream": "HiDreamImagePipeline",
    "hunyuan-image-2.1": "HunyuanImagePipeline",
}
# The smallest size each returns as asked: HunyuanDiT rounds down to 16s, Kandinsky 3 up to 64s,
# the Würstchen cascades to 128s (42.67 px a prior latent), HunyuanImage needs its VAE factor x2
# (16 here), and HiDream rescales every size to its native area (128 x 128 on this VAE).
SIZE = {"if-stage-1": 8, "if-stage-2": 32, "sd-flag-everything": 8, "flux-kontext": 8, "hunyuan-dit": 16,
        "kandinsky3": 64, "stable-cascade": 128, "wuerstchen": 128, "kolors": 8, "hidream": 128,
        "hunyuan-image-2.1": 16}

# The range of output_type="pt" images where it is not [0, 1]: IF's stages return [-1, 1] (so stage II
# takes stage I's output as it is); Kandinsky 3 returns its MoVQ's output unscaled and unclamped.
PT_RANGE = {"if-stage-1": (-1, 1), "if-stage-2": (-1, 1), "kandinsky3": (-float("inf"), float("inf"))}


def _image(size: int) -> Image.Image:
    return Image.new("RGB", (size, size), (200, 40, 40))


CALL_ARGS = {
    # Stage II upscales stage I's 8 px image 4x.
    "if-stage-2": {"image": _image(8)},
    # Kontext edits a reference image; unless told, it resizes that to about 1 MP and generates at
    # 1024 x 1024 whatever size is asked.
    "flux-kontext": {"image": _image(8), "max_area": 8 * 8, "_auto_resize": False},
    # Binning maps every size to a 1024-px one.
    "hunyuan-dit": {"use_resolution_binning": False},
    "stable-cascade": {"prior_num_inference_steps": 2},
    "wuerstchen": {"prior_num_inference_steps": 2},
}


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory):
    register_wuerstchen_module()
    return built_once(MORE_BUILDERS, tmp_path_factory)


def _generate(pipe, name: str, prompts: list[str]):
    size = SIZE[name]
    generators = [torch.Generator().manual_seed(seed) for seed in range(len(prompts))]
    return pipe(prompt=prompts, num_inference_steps=2, height=size, width=size, output_type="pt",
                generator=generators, **CALL_ARGS.get(name, {}))


def test_registry_names_each_family_once():
    assert set(MORE_BUILDERS) == set(PIPELINE_CLASS) == set(SIZE)


@pytest.mark.parametrize("name", sorted(PIPELINE_CLASS))
def test_family_saves_loads_and_generates(name, family_folder):
    folder = family_folder(name)
    weights = {p.suffix for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt")}
    assert weights == {".safetensors"}

    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == PIPELINE_CLASS[name]
    images = _generate(pipe, name, ["a red circle"]).images

    size = SIZE[name]
    assert tuple(images.shape) == (1, 3, size, size)
    assert torch.isfinite(images).all()
    low, high = PT_RANGE.get(name, (0, 1))
    assert images.min() >= low and images.max() <= high
    assert images.min() < 0 or name not in PT_RANGE
    if name != "sd-flag-everything":
        # Random weights still map a prompt and noise to an image, not to a constant.
        assert images.std() > 0.01


def test_safety_checker_flags_and_blacks_out_every_image(family_folder):
    pipe = DiffusionPipeline.from_pretrained(family_folder("sd-flag-everything"))
    assert type(pipe.safety_checker).__name__ == "StableDiffusionSafetyChecker"
    assert pipe.config.requires_safety_checker

    out = _generate(pipe, "sd-flag-everything", ["a red circle", "a blue square"])
    assert out.nsfw_content_detected == [True, True]
    assert torch.count_nonzero(out.images) == 0

    # The same UNet and VAE without the checker give a visible image: the black comes from the checker.
    pipe.safety_checker = None
    assert _generate(pipe, "sd-flag-everything", ["a red circle"]).images.std() > 0.01


def test_if_stages_encode_prompts_alike(family_folder):
    # The cascade reuses stage I's T5 embeddings in stage II: the two must be the same encoder.
    stage_1 = DiffusionPipeline.from_pretrained(family_folder("if-stage-1"))
    stage_2 = DiffusionPipeline.from_pretrained(family_folder("if-stage-2"))
    prompt = "a red circle on a blue background"
    embeds_1, negative_1 = stage_1.encode_prompt(prompt, device="cpu")
    embeds_2, negative_2 = stage_2.encode_prompt(prompt, device="cpu")
    assert torch.equal(embeds_1, embeds_2) and torch.equal(negative_1, negative_2)
