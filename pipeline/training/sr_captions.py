"""Teaching the upscaler the phrasings people write without losing what it does with the template:
caption distillation.

The teacher is an upscaler as it is (its U-Net and its caption encoder given the training
template, "a red circle on a blue background"): by default the saved one, which the student starts
as a copy of; a run may also continue a student from another teacher (``teacher``). Each step draws
scenes, noised latents and noised low-res inputs as ``sr`` trains, and a caption in one of the
training phrasings (or the template, or none); the student's U-Net output for that caption is
pulled towards the teacher's output for the template caption of the same scene, and the student's
encoding of the template caption towards the teacher's (the anchor). The target is the teacher's
prediction, not the training noise, so the student learns what a phrasing should do from a signal
without the noise of the DDPM loss, and the template keeps the teacher's behaviour.

With ``unet_lr_scale`` 0 only the caption encoder trains (the U-Net stays the teacher's); with a
positive one the U-Net follows at that fraction of the learning rate. ``unet_kept``
"cross-attention-kv" saves of the trained U-Net only the key and value projections of its
cross-attention, the one place where it reads the caption, and the teacher's weights elsewhere:
measured, a U-Net trained whole drifts off the teacher's template output however high the
template's share, and this keeps it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionUpscalePipeline

from pipeline.training import architectures, sr
from pipeline.training.captions import CaptionSampler
from pipeline.training.distributed import Cluster, Schedule, Worker, fit
from pipeline.training.latents import Denoiser, token_ids, vae_payload

NAME = sr.NAME
UNET_KEPT = ("all", "cross-attention-kv")
# The U-Net's weights that see only the caption (diffusers names its cross-attention attn2).
CROSS_ATTENTION_KV = ("attn2.to_k.weight", "attn2.to_v.weight")


@dataclass(frozen=True)
class CaptionDistillConfig:
    schedule: Schedule = field(default_factory=lambda: Schedule(steps=700, batch_size=32, lr=5e-4, warmup=20, ema_decay=0.0, log_every=25))
    scenes: int = 1500
    crop: int = 32  # whole latents, as the upscaler runs
    low_noise_level: int = sr.SRConfig.low_noise_level
    uncond_share: float = 0.1
    template_share: float = 0.0
    anchor: float = 10.0  # weight of the template-encoding term against the output term
    unet_lr_scale: float = 0.0  # 0: the U-Net frozen
    unet_kept: str = "all"  # or "cross-attention-kv": what of the trained U-Net is saved (the rest: the teacher's)


class _Student(Denoiser):
    """The Denoiser that also returns its encoding of the template captions, so that one forward
    through DDP carries both terms of the loss."""

    def forward(self, x, t, ids, template_ids, class_labels):
        hidden = self.text_encoder(torch.cat([ids, template_ids]))[0]
        text, template = hidden.split(len(ids))
        return self.unet(x, t, encoder_hidden_states=text, class_labels=class_labels).sample, template


def _loop(config: dict) -> None:
    worker = Worker(config)
    batches = sr.TrainingSet(config, worker)
    tokenizer = architectures.tokenizer()
    captions = CaptionSampler(tokenizer, batches.scenes, config["template_share"], config["uncond_share"])
    teacher = Denoiser(architectures.sr_unet(), architectures.text_encoder(tokenizer))
    teacher.load_state_dict(config["teacher"])
    teacher.to(worker.device).eval().requires_grad_(False)
    student = _Student(copy.deepcopy(teacher.unet), copy.deepcopy(teacher.text_encoder))
    student.load_state_dict(config["init"])
    student.train().requires_grad_(True)
    student.unet.requires_grad_(config["unet_lr_scale"] > 0)
    scheduler = architectures.noise_scheduler(sr.PREDICTION)

    def loss_fn(ddp):
        # 1. The upscaler's inputs for the drawn scenes, noised at a random step.
        idx = worker.batch_indices(len(batches.scenes))
        z0, noisy_low, levels = batches.draw(idx)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(idx),), generator=worker.generator).to(worker.device)
        x = torch.cat([scheduler.add_noise(z0, worker.randn(*z0.shape), t), noisy_low], dim=1)
        # 2. The teacher's output given the template caption of each scene.
        texts, templates = captions.texts(idx, worker.generator)
        template_ids = token_ids(tokenizer, templates).to(worker.device)
        with torch.no_grad():
            template_hidden = teacher.text_encoder(template_ids)[0]
            target = teacher.unet(x, t, encoder_hidden_states=template_hidden, class_labels=levels).sample
        # 3. The student's output given the drawn caption, and its encoding of the template.
        prediction, student_template = ddp(x, t, token_ids(tokenizer, texts).to(worker.device), template_ids, levels)
        return F.mse_loss(prediction, target) + config["anchor"] * F.mse_loss(student_template, template_hidden)

    worker.finish(worker.train(student, loss_fn, {"unet.": config["unet_lr_scale"]}))


def _state(folder: Path) -> tuple[StableDiffusionUpscalePipeline, dict]:
    pipe = StableDiffusionUpscalePipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    return pipe, Denoiser(pipe.unet, pipe.text_encoder).state_dict()


def train(out: Path, cluster: Cluster, config: CaptionDistillConfig = CaptionDistillConfig(),
          teacher: Path | None = None) -> Path:
    """Distil the captions of ``teacher`` (an upscaler folder; default: the one saved in
    ``out``/shapes-sr) into the upscaler saved in ``out`` (module docstring)."""
    if config.unet_kept not in UNET_KEPT:
        raise ValueError(f"unet_kept must be one of {', '.join(UNET_KEPT)}, not {config.unet_kept!r}")
    dest = out / NAME
    saved, init = _state(dest)
    config_dict = {
        **config.__dict__,
        "schedule": config.schedule.to_dict(),
        "vae": vae_payload(saved.vae),
        "init": init,
        "teacher": init if teacher is None else _state(teacher)[1],
    }
    state = fit(_loop, config_dict, cluster, f"{NAME}-captions")["ema"]
    if config.unet_kept == "cross-attention-kv":
        state = {k: config_dict["teacher"][k] if k.startswith("unet.") and not k.endswith(CROSS_ATTENTION_KV) else v
                 for k, v in state.items()}
    sr.assemble(saved.vae, state).save_pretrained(dest, safe_serialization=True)
    return dest
