"""Data-parallel training on Ray Train: the driver side (``fit``) and the worker side (``Worker``).

Every trainer is a loop function that Ray Train runs on each worker. The workers build the same
model from the same seed, DDP (``prepare_model``) averages their gradients, and each worker draws
its own batches and noise from a generator seeded with its rank, so a run depends only on the
seed and the number of workers. Rank 0 returns the final (EMA) weights through a Ray Train
checkpoint; the driver turns them into a diffusers pipeline. CPU workers here; ``use_gpu`` moves
the same code onto GPUs.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class Cluster:
    workers: int = 2
    threads_per_worker: int = 1
    use_gpu: bool = False
    # One worker in the calling process, without Ray: for a machine too loaded for a Ray node to
    # start (its raylet must register within 30 s), or a quick single-worker run.
    in_process: bool = False


@dataclass(frozen=True)
class Schedule:
    """How one model is optimised. ``batch_size`` is per worker."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 100
    ema_decay: float = 0.999
    log_every: int = 50
    seed: int = 0
    # A wall-clock budget: the run ends at ``steps`` or at this many seconds, whichever comes
    # first, and the cosine decay follows whichever is further along (a GPU run cannot overrun).
    max_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit(loop: Callable[[dict], None], config: dict[str, Any], cluster: Cluster, name: str) -> dict[str, Any]:
    """Run ``loop`` on ``cluster.workers`` Ray Train workers; return what rank 0 passed to ``finish``."""
    if cluster.in_process:
        _IN_PROCESS_RESULT.clear()
        loop({**config, "threads_per_worker": cluster.threads_per_worker, "in_process": True})
        return _IN_PROCESS_RESULT.pop()
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started_here = not ray.is_initialized()
    if started_here:
        # A private in-process cluster: never attach to (or stop) a Ray that someone else runs.
        ray.init(
            address="local",
            num_cpus=cluster.workers * cluster.threads_per_worker,
            include_dashboard=False,
            log_to_driver=True,
        )
    try:
        with tempfile.TemporaryDirectory(prefix=f"shardgen-train-{name}-") as storage:
            trainer = TorchTrainer(
                loop,
                train_loop_config={**config, "threads_per_worker": cluster.threads_per_worker},
                scaling_config=ScalingConfig(
                    num_workers=cluster.workers,
                    use_gpu=cluster.use_gpu,
                    resources_per_worker={"CPU": cluster.threads_per_worker},
                ),
                run_config=RunConfig(name=name, storage_path=storage),
            )
            result = trainer.fit()
            with result.checkpoint.as_directory() as folder:
                return torch.load(Path(folder) / STATE_FILE, weights_only=False)
    finally:
        if started_here:
            ray.shutdown()


# What ``Worker.finish`` hands back to ``fit`` in an in-process run.
_IN_PROCESS_RESULT: list[dict[str, Any]] = []


class EMA:
    """An exponential moving average of the weights, with warm-up (short runs need it most)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, value in module.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[key].lerp_(value.detach(), 1.0 - decay)
            else:
                self.shadow[key].copy_(value)


class Worker:
    """What a loop function needs on its worker: rank, seeded generators, device, the step loop."""

    def __init__(self, config: dict[str, Any]):
        self.in_process = bool(config.get("in_process"))
        if self.in_process:
            self.rank, self.world, self.device = 0, 1, torch.device("cpu")
        else:
            import ray.train
            import ray.train.torch

            context = ray.train.get_context()
            self.rank, self.world = context.get_world_rank(), context.get_world_size()
            self.device = ray.train.torch.get_device()
        self.schedule = Schedule(**config["schedule"])
        torch.set_num_threads(int(config["threads_per_worker"]))
        # Data order and noise differ per rank (otherwise the workers would repeat each other).
        self.generator = torch.Generator().manual_seed(self.schedule.seed * 1_000 + self.rank)
        # Noise is drawn where it is used: on a GPU, drawing it on the CPU and copying it over
        # each step would cost more than the small models' steps.
        self.noise_generator = self.generator
        if self.device.type == "cuda":
            self.noise_generator = torch.Generator(self.device).manual_seed(self.schedule.seed * 1_000 + self.rank)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(self.schedule.seed)

    def shard(self, items):
        """This worker's share of a list or array (every world-th item, from its rank)."""
        return items[self.rank :: self.world]

    def batch_indices(self, n: int) -> torch.Tensor:
        return torch.randint(n, (self.schedule.batch_size,), generator=self.generator)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.noise_generator, device=self.noise_generator.device).to(self.device)

    def train(self, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor],
              lr_scales: dict[str, float] | None = None) -> dict[str, Any]:
        """Optimise ``model`` (already seeded) for the scheduled steps and return its EMA weights and
        the logged losses. ``loss_fn(ddp_model)`` draws a batch and returns this worker's loss.
        ``lr_scales`` ({parameter name prefix: factor}) gives parts of the model a smaller step."""
        s = self.schedule
        if self.in_process:
            ddp, report = model, lambda metrics: None
        else:
            import ray.train
            import ray.train.torch

            ddp, report = ray.train.torch.prepare_model(model), ray.train.report
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]

        def scale(name: str) -> float:
            return next((f for prefix, f in (lr_scales or {}).items() if name.startswith(prefix)), 1.0)

        groups: dict[float, list[torch.nn.Parameter]] = {}
        for name, p in named:
            groups.setdefault(scale(name), []).append(p)
        opt = torch.optim.AdamW([{"params": ps, "scale": f} for f, ps in groups.items()], lr=s.lr, weight_decay=0.0)

        start = time.time()

        # Linear warm-up, then cosine decay to zero: short runs end on small, careful steps.
        def progress(step: int) -> float:
            """How far along the decay is, in [0, 1]: by steps, or by the wall-clock budget."""
            done = max(0, step - s.warmup) / max(1, s.steps - s.warmup)
            if s.max_seconds is not None:
                done = max(done, self._agreed(time.time() - start) / s.max_seconds)
            return min(1.0, done)

        def set_lr(step: int, done: float) -> None:
            factor = (step + 1) / s.warmup if step < s.warmup else 0.5 * (1 + math.cos(math.pi * done))
            for group in opt.param_groups:
                group["lr"] = s.lr * factor * group["scale"]

        ema = EMA(model, s.ema_decay)
        losses, window, step, done = [], [], 0, 0.0
        while step < s.steps and done < 1.0:
            set_lr(step, done)
            step += 1
            loss = loss_fn(ddp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            ema.update(model)
            window.append(loss.detach())  # no .item() here: it would wait for the GPU every step
            done = progress(step)
            if step % s.log_every == 0 or step == s.steps or done >= 1.0:
                mean = torch.stack(window).mean().item()
                losses.append((step, mean))
                window = []
                if self.rank == 0:
                    elapsed = time.time() - start
                    print(f"step {step}/{s.steps}  loss {mean:.4f}  {elapsed:.0f}s  {step / elapsed:.1f} steps/s", flush=True)
                # A barrier on every worker (all of them must report equally often).
                report({"step": step, "loss": mean})
        return {"ema": {k: v.cpu() for k, v in ema.shadow.items()}, "losses": losses, "steps": step, "seconds": time.time() - start}

    def _agreed(self, elapsed: float) -> float:
        """The largest elapsed time over the workers, so that all of them stop at the same step."""
        if self.world == 1:
            return elapsed
        value = torch.tensor([elapsed], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return float(value.item())

    def finish(self, payload: dict[str, Any]) -> None:
        """Hand ``payload`` (rank 0's) back to the driver as a checkpoint; all ranks must call it."""
        if self.in_process:
            _IN_PROCESS_RESULT.append(payload)
            return
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0:
                torch.save(payload, Path(folder) / STATE_FILE)
                checkpoint = Checkpoint.from_directory(folder)
            ray.train.report({"done": 1}, checkpoint=checkpoint)
