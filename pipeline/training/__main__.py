"""``python -m pipeline.training {vae,t2i,sr,inpaint,classifier,all,eval}``: train the built-in
shapes models on Ray Train and save them as diffusers pipelines, or measure them."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from pipeline.training.distributed import Cluster

TRAINED = Path(__file__).resolve().parent.parent / "models" / "trained"
# Dependency order: the UNets are trained in the VAE's latent space, and the super-resolution and
# inpainting models reuse the text-to-image model's text encoder.
ORDER = ("classifier", "vae", "t2i", "sr-vae", "sr", "inpaint")


def _with_steps(config, steps: int | None, field: str = "schedule"):
    """``config`` with the step count of its schedule ``field`` replaced (when given)."""
    if steps is None:
        return config
    schedule = getattr(config, field)
    return dataclasses.replace(config, **{field: dataclasses.replace(schedule, steps=steps, log_every=min(schedule.log_every, steps))})


def _train(name: str, out: Path, cluster: Cluster, steps: int | None, resume: bool) -> Path:
    if name == "classifier":
        from pipeline.training import classifier

        return classifier.train(out, _with_steps(classifier.ClassifierConfig(), steps))
    if name == "vae":
        from pipeline.training import vae

        return vae.train(out, cluster, _with_steps(vae.VAEConfig(), steps))
    if name == "t2i":
        from pipeline.training import t2i

        return t2i.train(out, cluster, _with_steps(t2i.T2IConfig(), steps), resume=resume)
    if name == "sr-vae":
        from pipeline.training import sr

        return sr.train_decoder(out, cluster, _with_steps(sr.SRConfig(), steps, "decoder"))
    if name == "sr":
        from pipeline.training import sr

        return sr.train(out, cluster, _with_steps(sr.SRConfig(), steps), resume=resume)
    from pipeline.training import inpaint

    return inpaint.train(out, cluster, _with_steps(inpaint.InpaintConfig(), steps))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.training", description=__doc__)
    parser.add_argument("what", choices=(*ORDER, "all", "eval"))
    parser.add_argument("--out", type=Path, default=TRAINED, help="folder of the saved models (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (data parallel)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and Ray CPUs) per worker")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    parser.add_argument("--resume", action="store_true", help="t2i, sr: continue from the model saved in --out")
    parser.add_argument("--images", type=int, default=None, help="eval: images per figure (default: the acceptance counts)")
    args = parser.parse_args(argv)
    if args.what == "eval":
        from pipeline.training import evaluate

        evaluate.main(args.out, args.images)
        return
    cluster = Cluster(workers=args.workers, threads_per_worker=args.threads, use_gpu=args.gpu)
    for name in ORDER if args.what == "all" else (args.what,):
        start = time.time()
        dest = _train(name, args.out, cluster, args.steps, args.resume)
        print(f"{name}: saved {dest} in {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
