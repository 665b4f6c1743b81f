"""Training the shapes models: the procedural set, the pixel measurements, and real Ray Train runs
(2 CPU workers, data parallel, on the session's Ray): one in which the DDPM loss falls, one that ends at its wall-clock
budget."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForText2Image, DDPMPipeline, StableDiffusionUpscalePipeline
from PIL import Image

from pipeline.images import keep_unmasked
from pipeline.training import architectures, captions, data, ddpm, evaluate, measure, sr, sr_captions, t2i, vae
from pipeline.training.__main__ import TRAINED, main
from pipeline.training.classifier import NAME as CLASSIFIER_NAME
from pipeline.training.classifier import ShapeClassifier
from pipeline.training.distributed import Cluster, Schedule, Worker, fit
from pipeline.training.latents import vae_payload


def test_scenes_are_a_function_of_the_seed():
    assert data.sample_scenes(50, seed=3) == data.sample_scenes(50, seed=3)
    assert data.sample_scenes(50, seed=3) != data.sample_scenes(50, seed=4)
    scene = data.sample_scenes(1, seed=0)[0]
    assert scene.caption.split()[1:3] == [scene.colour, scene.shape]
    assert data.caption("circle", "orange", "blue") == "an orange circle on a blue background"


def test_low_and_high_res_renders_are_the_same_scene():
    scene = data.Scene("triangle", "red", "blue", 0.5, 0.5, 0.3)
    low, high = data.render(scene, 32), data.render(scene, 128)
    pooled = high.astype(np.float32).reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
    assert np.abs(pooled - low).mean() < 3.0


def test_measuring_a_render_recovers_its_colours():
    for scene in data.sample_scenes(40, seed=7):
        reading = measure.read(data.render(scene))
        assert (reading.colour, reading.background) == (scene.colour, scene.background)
    flat = np.full((32, 32, 3), data.PALETTE["green"], np.uint8)
    assert measure.read(flat).colour is None


def test_keep_unmasked_keeps_every_pixel_outside_the_mask():
    rng = np.random.default_rng(0)
    original, generated = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    mask = data.box_mask((8, 8, 20, 24), 32)
    out = keep_unmasked(original, generated, (mask * 255).astype(np.uint8))
    assert np.array_equal(out[mask < 0.5], original[mask < 0.5])
    assert np.array_equal(out[mask >= 0.5], generated[mask >= 0.5])


def test_standardising_the_latents_leaves_decoded_images_unchanged():
    torch.manual_seed(0)
    model = architectures.vae().eval()
    images = torch.from_numpy(data.to_tensor_range(data.render_all(data.sample_scenes(16, seed=1))))
    with torch.no_grad():
        before = model.decode(model.encode(images).latent_dist.mean).sample
        vae.standardise(model, images)
        latents = model.encode(images).latent_dist.mean
        after = model.decode(latents).sample
    assert torch.allclose(before, after, atol=1e-4)
    assert torch.allclose(latents.std(dim=(0, 2, 3)) * architectures.SCALING_FACTOR, torch.ones(4), atol=1e-3)


def test_ray_train_ddpm_loss_falls_and_saves_a_loadable_pipeline(tmp_path, ray_local):
    torch.manual_seed(0)
    random_vae = architectures.vae().eval()
    schedule = Schedule(steps=40, batch_size=16, lr=2e-3, warmup=5, log_every=10)
    config = t2i.T2IConfig(schedule=schedule, scenes=256)
    payload = fit(
        t2i._loop,
        {**config.__dict__, "schedule": schedule.to_dict(), "vae": vae_payload(random_vae), "init": None},
        Cluster(workers=2, threads_per_worker=1),
        "test-t2i",
    )
    losses = [loss for _, loss in payload["losses"]]
    assert len(losses) == 4
    assert losses[-1] < 0.8 * losses[0], losses

    t2i.assemble(random_vae, payload["ema"]).save_pretrained(tmp_path, safe_serialization=True)
    pipe = AutoPipelineForText2Image.from_pretrained(tmp_path, dtype=torch.float32, use_safetensors=True,
                                                     local_files_only=True)
    image = pipe("a red circle on a blue background", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_aligned_crops_cut_the_same_window_at_each_scale():
    latents, images = torch.randn(6, 4, 32, 32), torch.randn(6, 3, 128, 128)
    worker = Worker.__new__(Worker)  # only its generator is used here
    worker.generator = torch.Generator().manual_seed(0)
    idx = torch.tensor([5, 0, 5, 2])
    z, x = sr._aligned_crops(idx, 8, worker, latents, images)
    corners = torch.randint(32 - 8 + 1, (4, 2), generator=torch.Generator().manual_seed(0)).tolist()
    for k, (i, (y, x0)) in enumerate(zip(idx.tolist(), corners)):
        assert torch.equal(z[k], latents[i, :, y : y + 8, x0 : x0 + 8])
        assert torch.equal(x[k], images[i, :, 4 * y : 4 * (y + 8), 4 * x0 : 4 * (x0 + 8)])


def test_a_wall_clock_budget_ends_the_run_on_every_worker(tmp_path, ray_local):
    torch.manual_seed(0)
    random_vae = architectures.vae().eval()
    steps = 1_000_000  # far more than fit in the budget: the budget must end the run
    schedule = Schedule(steps=steps, batch_size=4, lr=1e-3, warmup=2, log_every=1000, max_seconds=5.0)
    config = sr.SRConfig(schedule=schedule, scenes=16, crop=32)
    payload = fit(
        sr._loop,
        {
            **config.__dict__,
            "schedule": schedule.to_dict(),
            "vae": vae_payload(random_vae),
            "text_encoder": architectures.text_encoder(architectures.tokenizer()).state_dict(),
            "init": None,
        },
        Cluster(workers=2, threads_per_worker=1),
        "test-sr-budget",
    )
    assert 0 < payload["steps"] < steps  # a loaded machine may fit only a step or two in the budget
    assert payload["losses"][-1][0] == payload["steps"]  # the last step is logged, on both workers
    assert np.isfinite(payload["losses"][-1][1])


def _all_captions(phrasings) -> set[str]:
    words = list(itertools.product(data.SHAPES, data.COLOURS, data.COLOURS))
    return {captions.phrase(p, shape, c, b) for p in phrasings for shape, c, b in words if c != b}


def test_held_out_phrasings_are_never_drawn_in_training():
    training = _all_captions((captions.TEMPLATE, *captions.TRAIN_PHRASINGS))
    assert not training & _all_captions(captions.HELD_OUT_PHRASINGS)
    assert captions.phrase(captions.TEMPLATE, "circle", "orange", "blue") == data.caption("circle", "orange", "blue")
    tokenizer = architectures.tokenizer()
    scenes = data.sample_scenes(50, seed=5)
    sampler = captions.CaptionSampler(tokenizer, scenes, template_share=0.3, uncond_share=0.1)
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(len(scenes), (600,), generator=generator)
    drawn = [d.replace(" ,", ",") for d in tokenizer.batch_decode(sampler(idx, generator), skip_special_tokens=True)]
    templates = [scenes[i].caption for i in idx.tolist()]
    assert set(drawn) <= training | {""}
    assert 0.2 < np.mean([d == t for d, t in zip(drawn, templates)]) < 0.4
    assert 0.05 < np.mean([d == "" for d in drawn]) < 0.15
    # Every drawn caption names its own scene's shape and colour.
    assert all(d == "" or (scenes[i].shape in d and scenes[i].colour in d) for d, i in zip(drawn, idx.tolist()))
    # Inpainting's sampler draws many more captions that leave the background out, all of them training ones.
    shape_only = captions.CaptionSampler(tokenizer, scenes, template_share=0.3, uncond_share=0.1, shape_only_share=0.6)
    decoded = tokenizer.batch_decode(shape_only(idx, generator), skip_special_tokens=True)
    inpainting = [d.replace(" ,", ",") for d in decoded]
    assert set(inpainting) <= training | {""}
    unnamed = _all_captions(shape_only.shape_only)
    assert unnamed and not any(map(captions.mentions_background, shape_only.shape_only))
    no_background = lambda texts: np.mean([t in unnamed for t in texts])  # noqa: E731
    shares = no_background(drawn), no_background(inpainting)
    assert shares[0] < 0.25 and shares[1] > 0.4, shares


@pytest.fixture(scope="module")
def classifier() -> ShapeClassifier:
    return ShapeClassifier(TRAINED / CLASSIFIER_NAME)


def test_clean_shape_measure_accepts_renders_and_refuses_noise(classifier):
    renders = data.render_all(data.sample_scenes(40, seed=9))
    assert evaluate.clean_shapes(renders, classifier)["clean_share"] >= 0.95
    rng = np.random.default_rng(0)
    noisy = np.clip(renders + rng.normal(0, 60, renders.shape), 0, 255).astype(np.uint8)
    blank = np.broadcast_to(np.array(data.PALETTE["blue"], np.uint8), renders.shape).copy()
    assert evaluate.clean_shapes(noisy, classifier)["clean_share"] <= 0.1
    assert evaluate.clean_shapes(blank, classifier)["clean_share"] == 0.0


def test_ddpm_trains_in_process_and_saves_a_ddpm_pipeline(tmp_path):
    schedule = Schedule(steps=4, batch_size=2, lr=1e-3, warmup=1, log_every=2)
    dest = ddpm.train(tmp_path, Cluster(workers=1, in_process=True), ddpm.DDPMConfig(schedule=schedule, scenes=8))
    assert (dest / "model_index.json").is_file() and (dest / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = DDPMPipeline.from_pretrained(dest, use_safetensors=True, local_files_only=True)
    image = pipe(batch_size=1, num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_compare_sr_pairs_scenes_so_a_model_against_itself_differs_by_nothing(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    base = TRAINED / sr.NAME
    other = tmp_path / sr.NAME
    shutil.copytree(base, other)
    weights_file = other / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    weights["conv_out.bias"] = weights["conv_out.bias"] + 0.05  # a shift every scene's output carries
    save_file(weights, weights_file)
    same = evaluate.sr_paired(base, base, 3, evaluate.PHRASINGS["template"])
    assert same == {"mean_db": 0.0, "standard_error_db": 0.0, "worse": 0, "n": 3}
    shifted = evaluate.sr_paired(base, other, 3, evaluate.PHRASINGS["template"])
    assert shifted["mean_db"] != 0.0 and shifted["standard_error_db"] > 0.0
    main(["compare-sr", "--models", str(base), str(other), "--images", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(evaluate.PHRASINGS)
    assert all("other - base:" in line and "of 2 scenes" in line for line in lines)
    with pytest.raises(SystemExit, match="two upscaler folders"):
        main(["compare-sr", "--models", str(base)])


@pytest.mark.parametrize(("unet_lr_scale", "unet_kept"), [(0.0, "all"), (0.5, "all"), (0.5, "cross-attention-kv")])
def test_caption_distillation_moves_what_it_trains_and_saves_a_loadable_upscaler(tmp_path, unet_lr_scale, unet_kept):
    shutil.copytree(TRAINED / sr.NAME, tmp_path / sr.NAME)
    before = StableDiffusionUpscalePipeline.from_pretrained(tmp_path / sr.NAME, local_files_only=True)
    schedule = Schedule(steps=3, batch_size=2, lr=1e-3, warmup=1, ema_decay=0.0, log_every=1)
    config = sr_captions.CaptionDistillConfig(schedule=schedule, scenes=8, unet_lr_scale=unet_lr_scale,
                                              unet_kept=unet_kept)
    # The U-Net trains from another teacher (here the shipped upscaler itself: the same weights).
    teacher = TRAINED / sr.NAME if unet_lr_scale else None
    dest = sr_captions.train(tmp_path, Cluster(workers=1, in_process=True), config, teacher)
    after = StableDiffusionUpscalePipeline.from_pretrained(dest, local_files_only=True)

    def changed(a: torch.nn.Module, b: torch.nn.Module) -> set[str]:
        return {k for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()) if not torch.equal(x, y)}

    assert changed(before.text_encoder, after.text_encoder)
    moved = changed(before.unet, after.unet)
    if unet_lr_scale == 0:
        assert not moved  # the teacher's U-Net, bit for bit
    elif unet_kept == "all":
        assert any("attn2" not in k for k in moved)
    else:  # the teacher's U-Net but for the cross-attention's key and value projections, all of them trained
        kv = {k for k in before.unet.state_dict() if k.endswith(sr_captions.CROSS_ATTENTION_KV)}
        assert moved == kv and len(kv) > 0
    assert not changed(before.vae, after.vae)
    low = Image.fromarray(data.render(data.sample_scenes(1, 5)[0]))
    image = after("a red circle", image=low, num_inference_steps=2, noise_level=20, guidance_scale=1.0,
                  output_type="np").images[0]
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()


def test_caption_distillation_names_an_unknown_unet_kept_choice(tmp_path):
    config = sr_captions.CaptionDistillConfig(unet_kept="attention")
    with pytest.raises(ValueError, match="unet_kept must be one of all, cross-attention-kv, not 'attention'"):
        sr_captions.train(tmp_path, Cluster(workers=1, in_process=True), config)
