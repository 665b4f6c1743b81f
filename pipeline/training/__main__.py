"""``python -m pipeline.training {vae,t2i,sr,sr-captions,inpaint,ddpm,classifier,controlnet,all,eval,eval-sr,compare-sr,
eval-controlnet}``:
train the built-in shapes models on Ray Train and save them as diffusers pipelines, or measure them."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from pipeline.training.distributed import Cluster

TRAINED = Path(__file__).resolve().parent.parent / "models" / "trained"
# Dependency order: the UNets are trained in the VAE's latent space, and the super-resolution and
# inpainting models reuse the text-to-image model's text encoder; sr-captions distils into the saved
# upscaler; the pixel-space DDPM needs nothing.
ORDER = ("classifier", "vae", "t2i", "sr-vae", "sr", "sr-captions", "inpaint", "ddpm")
# Config fields the command line may set, besides the schedule's.
CONFIG_FLAGS = ("scenes", "crop", "unet_lr_scale", "unet_kept", "template_share")


def _configured(config, args: argparse.Namespace, field: str = "schedule"):
    """``config`` with what the command line overrides in its schedule ``field`` (step count,
    batch size, wall-clock budget) and in the config itself (scene count, crop size)."""
    schedule = getattr(config, field)
    if args.steps is not None:
        schedule = dataclasses.replace(schedule, steps=args.steps, log_every=min(schedule.log_every, args.steps))
    if args.batch is not None:
        schedule = dataclasses.replace(schedule, batch_size=args.batch)
    if args.lr is not None:
        schedule = dataclasses.replace(schedule, lr=args.lr)
    if args.max_minutes is not None:
        schedule = dataclasses.replace(schedule, max_seconds=60.0 * args.max_minutes)
    fields = {f.name for f in dataclasses.fields(config)}
    extra = {key: getattr(args, key) for key in CONFIG_FLAGS if getattr(args, key) is not None}
    for key in extra.keys() - fields:
        raise SystemExit(f"--{key.replace('_', '-')} does not apply to this model (its config has no field {key!r})")
    return dataclasses.replace(config, **{field: schedule}, **extra)


def _train(name: str, out: Path, cluster: Cluster, args: argparse.Namespace) -> Path:
    if name == "classifier":
        from pipeline.training import classifier

        return classifier.train(out, _configured(classifier.ClassifierConfig(), args))
    if name == "vae":
        from pipeline.training import vae

        return vae.train(out, cluster, _configured(vae.VAEConfig(), args))
    if name == "t2i":
        from pipeline.training import t2i

        return t2i.train(out, cluster, _configured(t2i.T2IConfig(), args), resume=args.resume)
    if name == "controlnet":
        from pipeline.training import controlnet

        return controlnet.train(out, cluster, _configured(controlnet.ControlNetConfig(), args))
    if name == "sr-vae":
        from pipeline.training import sr

        return sr.train_decoder(out, cluster, _configured(sr.SRConfig(), args, "decoder"))
    if name == "sr":
        from pipeline.training import sr

        return sr.train(out, cluster, _configured(sr.SRConfig(), args), resume=args.resume)
    if name == "sr-captions":
        from pipeline.training import sr_captions

        return sr_captions.train(out, cluster, _configured(sr_captions.CaptionDistillConfig(), args), args.teacher)
    if name == "ddpm":
        from pipeline.training import ddpm

        return ddpm.train(out, cluster, _configured(ddpm.DDPMConfig(), args))
    from pipeline.training import inpaint

    return inpaint.train(out, cluster, _configured(inpaint.InpaintConfig(), args), resume=args.resume)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.training", description=__doc__)
    parser.add_argument("what", choices=(*ORDER, "controlnet", "all", "eval", "eval-sr", "compare-sr",
                                         "eval-controlnet"))
    parser.add_argument("--out", type=Path, default=TRAINED, help="folder of the saved models (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (data parallel)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and Ray CPUs) per worker")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--in-process", action="store_true",
                        help="one worker in this process, without Ray (a machine too loaded for a Ray node to start)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    parser.add_argument("--batch", type=int, default=None, help="override the batch size (per worker)")
    parser.add_argument("--lr", type=float, default=None, help="override the peak learning rate (fine-tuning wants a lower one)")
    parser.add_argument("--max-minutes", type=float, default=None, help="Ray Train models: end the run (and its lr decay) at this wall-clock budget")
    parser.add_argument("--scenes", type=int, default=None, help="override the number of training scenes")
    parser.add_argument("--crop", type=int, default=None, help="sr: training crop, in latent (= low-res) pixels; 32 is the whole image")
    parser.add_argument("--unet-lr-scale", type=float, default=None,
                        help="sr-captions: the U-Net's learning rate as a fraction of the caption encoder's (0: frozen)")
    parser.add_argument("--unet-kept", default=None,
                        help="sr-captions: what of the trained U-Net is saved: all (the default) or cross-attention-kv "
                             "(the key and value projections of its cross-attention; the teacher's weights elsewhere)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="sr-captions: the upscaler folder to distil from (default: the one saved in --out)")
    parser.add_argument("--template-share", type=float, default=None,
                        help="t2i, sr, sr-captions, inpaint: share of training captions in the template phrasing")
    parser.add_argument("--resume", action="store_true", help="t2i, sr, inpaint: continue from the model saved in --out")
    parser.add_argument("--images", type=int, default=None, help="eval: images per figure (default: the acceptance counts); eval-sr, compare-sr: scenes (default 100, 200)")
    parser.add_argument("--models", type=Path, nargs="+", default=None, help="eval-sr: upscaler folders (default: --out's shapes-sr); compare-sr: the base folder, then the other")
    parser.add_argument("--device", default="cpu", help="eval-sr, compare-sr: torch device of the pipelines")
    parser.add_argument("--json", type=Path, default=None, help="eval-sr: also write the figures to this file")
    args = parser.parse_args(argv)
    if args.what == "eval-sr":
        from pipeline.training import evaluate

        evaluate.sr_figures(args.models or [args.out / "shapes-sr"], args.images or 100, args.device, args.json)
        return
    if args.what == "compare-sr":
        from pipeline.training import evaluate

        if not args.models or len(args.models) != 2:
            raise SystemExit("compare-sr: --models takes two upscaler folders, the base and the other")
        for key, phrasings in evaluate.PHRASINGS.items():
            figures = evaluate.sr_paired(*args.models, args.images or 200, phrasings, args.device)
            print(f"{key:<11} other - base: {figures['mean_db']:+.3f} dB, standard error {figures['standard_error_db']:.3f} dB, "
                  f"worse on {figures['worse']} of {figures['n']} scenes", flush=True)
        return
    if args.what == "eval-controlnet":
        from pipeline.training import controlnet

        controlnet.measure(args.out, args.images or 200)
        return
    if args.what == "eval":
        from pipeline.training import evaluate

        evaluate.main(args.out, args.images)
        return
    if args.in_process and (args.workers != 1 or args.gpu):
        raise SystemExit("--in-process runs one CPU worker: use it with --workers 1 and without --gpu")
    cluster = Cluster(workers=args.workers, threads_per_worker=args.threads, use_gpu=args.gpu, in_process=args.in_process)
    for name in ORDER if args.what == "all" else (args.what,):
        start = time.time()
        dest = _train(name, args.out, cluster, args)
        print(f"{name}: saved {dest} in {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
