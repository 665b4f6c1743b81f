"""The synthetic-data experiment (`make synth-eval`): does a classifier trained on what shardgen
generates recognise real shapes?

1. A class list (the 5 shapes) and a template with colour and background slots become one
   manifest per guidance scale (`shardgen manifest synth`: same seed, so the same prompts and
   seeds at every guidance), generated THROUGH shardgen (run_job) by the built-in shapes-t2i, with
   the filters on (exact and near duplicates, shape-classifier confidence).
2. A fresh small CNN (not the filter's shape-classifier) is trained on (a) real procedural renders,
   (b) synthetic only, (c) synthetic with filtered rows left out, (d) 20 real per class, (e) 20
   real per class plus filtered synthetic; each arm with several training seeds.
3. Every arm is evaluated on held-out real renders (seeds no generator training used).

It prints a table and writes it between markers into docs/synthetic-data.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from pipeline.spec import parse_spec
from pipeline.stats import Stats
from pipeline.synth import filters
from pipeline.synth import manifest as synth_manifest
from pipeline.training import data
from pipeline.training.evaluate import HELD_OUT_SEED

REAL_TRAIN_SEED = 7_000  # training scenes of this experiment's real arms (< 50_000, like the generators')
EVAL_SEED = HELD_OUT_SEED + 10  # held-out: no generator training and no other evaluation uses it
FEW_REAL_PER_CLASS = 20
MARK_START, MARK_END = "<!-- synth-eval:start -->", "<!-- synth-eval:end -->"


@dataclass
class Config:
    work: Path
    rows_per_guidance: int = 2000
    guidances: tuple[float, ...] = (1.5, 2.0, 4.0, 7.5)
    steps: int = 20  # sampler steps (the model's DPM-Solver++)
    train_seeds: int = 3
    eval_images: int = 2000
    train_steps: int = 300  # CNN optimiser steps per arm
    batch_size: int = 16  # generation batch
    manifest_seed: int = 0


def classes_and_templates(work: Path) -> tuple[Path, Path]:
    """The class list and template of the experiment, as a user would write them."""
    work.mkdir(parents=True, exist_ok=True)
    classes, templates = work / "classes.yaml", work / "templates.yaml"
    classes.write_text(yaml.safe_dump({"classes": [{"name": s} for s in data.SHAPES]}))
    templates.write_text(yaml.safe_dump({
        "templates": ["{a_colour} {class} on {a_background} background"],
        "slots": {"colour": list(data.COLOURS), "background": list(data.COLOURS)},
        "distinct": [["colour", "background"]],  # a shape on its own colour is invisible
    }))
    return classes, templates


def folder_of(config: Config, guidance: float) -> Path:
    return config.work / f"g{guidance:g}"


def generate(config: Config, guidance: float, log=print) -> tuple[Path, Stats]:
    """One guidance scale's images, through shardgen: manifest, then run_job (resumed or skipped
    when the output is already there)."""
    from pipeline.job import run_job

    if not (folder_of(config, guidance) / "output" / "_SUCCESS").exists():
        start_ray()
    classes, templates = classes_and_templates(config.work)
    folder = folder_of(config, guidance)
    manifest_path = folder / "manifest.parquet"
    if not manifest_path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        synth_manifest.main(str(classes), str(templates), config.rows_per_guidance // len(data.SHAPES),
                            config.manifest_seed, "train=1", str(manifest_path), guidance=f"{guidance:g}")
    spec = parse_spec({
        "manifest": str(manifest_path),
        "output": str(folder / "output"),
        "stages": [{"kind": "text_to_image", "model": "builtin:shapes-t2i", "steps": config.steps, "width": 32,
                    "height": 32, "batch_size": config.batch_size, "batch_invariant": False}],
        "format": {"rows_per_shard": 500},
        "filters": {"exact_duplicates": True, "near_duplicate_distance": 2,
                    "confidence": {"model": "builtin:shape-classifier"}},
    })
    return folder / "output", run_job(spec, log=log)


def read_output(output: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(output / "data", columns=["image", "label", "status"])
    images = np.stack([np.asarray(Image.open(io.BytesIO(i["bytes"])).convert("RGB")) if i else
                       np.zeros((32, 32, 3), np.uint8) for i in table.column("image").to_pylist()])
    return {"images": images, "labels": np.array(table.column("label").to_pylist()),
            "status": np.array(table.column("status").to_pylist())}


def real_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    scenes = data.sample_scenes(n, seed)
    return data.render_all(scenes, data.LOW_RES), np.array([data.SHAPES.index(s.shape) for s in scenes])


def few_per_class(images: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.concatenate([np.flatnonzero(labels == c)[:k] for c in range(len(data.SHAPES))])
    return images[keep], labels[keep]


class SmallCNN(torch.nn.Module):
    """A fresh classifier on RGB images (the filter's shape-classifier reads alpha maps)."""

    def __init__(self, classes: int):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).amax(dim=(2, 3)))


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(data.to_tensor_range(images))


def train_and_test(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], seed: int,
                   steps: int) -> tuple[float, list[float]]:
    """Accuracy and per-class accuracy on ``test`` of a SmallCNN trained on ``train``."""
    torch.manual_seed(seed)
    x, y = _tensor(train[0]), torch.from_numpy(train[1]).long()
    model = SmallCNN(len(data.SHAPES))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=generator)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(_tensor(test[0][i:i + 500])).argmax(1) for i in range(0, len(test[0]), 500)])
    correct = (predicted.numpy() == test[1])
    return float(correct.mean()), [float(correct[test[1] == c].mean()) for c in range(len(data.SHAPES))]


@dataclass
class Arm:
    name: str
    images: int
    accuracies: list[float] = field(default_factory=list)
    per_class: list[list[float]] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def spread(self) -> float:
        return float(np.std(self.accuracies))


@dataclass
class GuidanceFigures:
    guidance: float
    rows: int
    images_per_s: float | None
    filter_pass_rate: float | None
    exact_duplicate_rate: float
    near_duplicate_rate: float
    low_confidence_rate: float


def _train_arm(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
               config: Config, log) -> Arm:
    arm = Arm(name, len(train[1]))
    for seed in range(config.train_seeds):
        start = time.time()
        accuracy, per_class = train_and_test(train, test, seed, config.train_steps)
        arm.accuracies.append(accuracy)
        arm.per_class.append(per_class)
        log(f"{name} seed {seed}: accuracy {accuracy:.3f} ({time.time() - start:.0f} s)")
    return arm


def run(config: Config, log=print) -> tuple[list[Arm], list[GuidanceFigures]]:
    """Generate at every guidance, then train and test every arm; (e) adds to the 20 real images
    per class the filtered synthetic set of the guidance whose (c) arm scored best."""
    test = real_set(config.eval_images, EVAL_SEED)
    real = real_set(config.rows_per_guidance, REAL_TRAIN_SEED)
    few = few_per_class(*real, FEW_REAL_PER_CLASS)
    synthetic, filtered, figures = {}, {}, []
    for g in config.guidances:
        output, stats = generate(config, g, log)
        out = read_output(output)
        usable = out["status"] != "error"
        kept = out["status"] == "ok"
        synthetic[g] = (out["images"][usable], out["labels"][usable])
        filtered[g] = (out["images"][kept], out["labels"][kept])
        candidates = max(1, int(usable.sum()))
        by_reason = stats.filtered_by_reason
        figures.append(GuidanceFigures(
            g, stats.rows, stats.images_per_s, stats.filter_pass_rate,
            by_reason.get(filters.EXACT, 0) / candidates, by_reason.get(filters.NEAR, 0) / candidates,
            by_reason.get(filters.LOW_CONFIDENCE, 0) / candidates))
    arms = [_train_arm("(a) real", real, test, config, log)]
    arms += [_train_arm(f"(b) synthetic g={g:g}", synthetic[g], test, config, log) for g in config.guidances]
    filtered_arms = {g: _train_arm(f"(c) filtered g={g:g}", filtered[g], test, config, log) for g in config.guidances}
    arms += list(filtered_arms.values())
    arms.append(_train_arm(f"(d) {FEW_REAL_PER_CLASS} real/class", few, test, config, log))
    best = max(filtered_arms, key=lambda g: filtered_arms[g].mean)
    both = (np.concatenate([few[0], filtered[best][0]]), np.concatenate([few[1], filtered[best][1]]))
    arms.append(_train_arm(f"(e) {FEW_REAL_PER_CLASS} real/class + filtered g={best:g}", both, test, config, log))
    return arms, figures


def table(config: Config, arms: list[Arm], figures: list[GuidanceFigures]) -> str:
    real = next(a for a in arms if a.name == "(a) real").mean
    lines = [
        f"Test set: {config.eval_images} held-out real renders (seed {EVAL_SEED}). {config.train_seeds} training "
        f"seed(s) per arm, {config.train_steps} steps of batch 64 each. {config.rows_per_guidance} generated rows per "
        f"guidance ({config.steps} DPM-Solver++ steps, 32x32).",
        "",
        "| arm | training images | accuracy (mean ± std) | synthetic/real | " + " | ".join(data.SHAPES) + " |",
        "|---|---|---|---|" + "---|" * len(data.SHAPES),
    ]
    for a in arms:
        per_class = np.mean(a.per_class, axis=0)
        lines.append(f"| {a.name} | {a.images} | {a.mean:.1%} ± {a.spread:.1%} | {a.mean / real:.3f} | "
                     + " | ".join(f"{p:.1%}" for p in per_class) + " |")
    lines += ["", "| guidance | rows | images/s (whole job) | filter pass rate | exact duplicates | near duplicates "
              "| low confidence |", "|---|---|---|---|---|---|---|"]
    for f in figures:
        rate = f"{f.images_per_s:.2f}" if f.images_per_s else "n/a (output already complete)"
        lines.append(f"| {f.guidance:g} | {f.rows} | {rate} | {f.filter_pass_rate:.1%} | {f.exact_duplicate_rate:.1%} "
                     f"| {f.near_duplicate_rate:.1%} | {f.low_confidence_rate:.1%} |")
    return "\n".join(lines)


def _provenance() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"Commit {commit}; {platform.machine()} {platform.system()}, {os.cpu_count()} CPU(s), Python "
            f"{platform.python_version()}, torch {torch.__version__}; load average at the end {load}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")


def write_doc(doc: Path, text: str) -> None:
    """Put ``text`` between the markers of ``doc`` (appended with them if missing)."""
    old = doc.read_text() if doc.exists() else ""
    block = f"{MARK_START}\n{text}\n{MARK_END}"
    if MARK_START in old and MARK_END in old:
        new = old[: old.index(MARK_START)] + block + old[old.index(MARK_END) + len(MARK_END):]
    else:
        new = old + ("\n" if old else "") + block + "\n"
    doc.write_text(new)


def start_ray() -> None:
    """The Ray in RAY_ADDRESS, else a local Ray of 2 CPUs (started again where a loaded machine's
    raylet misses Ray's start-up window: cluster.retry_local_start)."""
    import ray

    from pipeline.cluster import retry_local_start

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(include_dashboard=False, log_to_driver=False)
        return
    retry_local_start(lambda: ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.synth.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--work", default="synth-eval", help="folder for the manifests and generated outputs")
    p.add_argument("--rows-per-guidance", type=int, default=Config.rows_per_guidance)
    p.add_argument("--guidances", default="1.5,2,4,7.5")
    p.add_argument("--steps", type=int, default=Config.steps)
    p.add_argument("--train-seeds", type=int, default=Config.train_seeds)
    p.add_argument("--train-steps", type=int, default=Config.train_steps)
    p.add_argument("--eval-images", type=int, default=Config.eval_images)
    p.add_argument("--doc", help="write the table into this Markdown file (between its synth-eval markers)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    config = Config(Path(args.work).absolute(), args.rows_per_guidance,
                    tuple(float(g) for g in args.guidances.split(",")), args.steps, args.train_seeds,
                    args.eval_images, args.train_steps)
    torch.set_num_threads(1)  # a shared machine; Ray's actors run their own threads
    start = time.time()
    arms, figures = run(config)
    text = table(config, arms, figures) + f"\n\n{_provenance()} Wall time {(time.time() - start) / 60:.1f} min."
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": {**asdict(config), "work": str(config.work)},
                                               "arms": [asdict(a) for a in arms],
                                               "guidance": [asdict(f) for f in figures]}, indent=1) + "\n")
    if args.doc:
        write_doc(Path(args.doc), text)


if __name__ == "__main__":
    main()
