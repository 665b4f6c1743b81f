"""What one stage actor measures about itself: where its time goes (loading, waiting for input,
inside the pipeline) and, on a GPU, how busy the GPU was and its peak memory. The plan builder
collects every actor's figures; _stats.json sums them up per stage (pipeline/stats.py)."""

from __future__ import annotations

import time

import torch

from pipeline.gpu_sampler import GpuSampler
from pipeline.stats import ActorMetrics


class ActorClock:
    """Keeps an actor's ActorMetrics as batches come and go."""

    def __init__(self, kind: str, device: str):
        self.metrics = ActorMetrics(kind)
        self.born = time.time()
        self.last_end: float | None = None
        # Started with the first batch, so its mean covers the actor's working time.
        self.sampler = GpuSampler(period_s=0.1, keep=False) if device == "cuda" else None

    def loaded(self) -> None:
        self.metrics.load_s = round(time.time() - self.born, 3)

    def batch_starts(self) -> None:
        if self.last_end is not None:
            self.metrics.wait_s += time.time() - self.last_end
        if self.sampler is not None:
            self.sampler.start()  # once: a running sampler is left as it is

    def pipeline_ran(self, seconds: float, rows: int, capacity: int) -> None:
        """One pipeline call of ``rows`` rows took ``seconds``; it could have held ``capacity``."""
        m = self.metrics
        m.pipeline_s += seconds
        m.calls += 1
        m.call_rows += rows
        m.call_capacity += capacity

    def batch_ends(self, rows: int) -> None:
        m = self.metrics
        self.last_end = time.time()
        m.batches += 1
        m.rows += rows
        if m.first_image_s is None:
            m.first_image_s = round(self.last_end - self.born, 3)
        if self.sampler is not None:
            m.gpu_busy = self.sampler.mean_busy()
            m.peak_gpu_memory_gb = round(torch.cuda.max_memory_allocated() / 2**30, 2)
