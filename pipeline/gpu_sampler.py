"""The GPU's utilisation and memory in use, sampled through NVML in a thread, with timestamps, so
that any window of a run can be averaged afterwards. Used by `shardgen bench --gpu` and by every
stage actor on a GPU (its busy share in _stats.json). Inert without an NVIDIA GPU."""

from __future__ import annotations

import os
import threading
import time

import torch


def _nvml_handle(nvml):
    """NVML's handle of the GPU torch uses. NVML numbers GPUs physically and ignores
    CUDA_VISIBLE_DEVICES, which Ray sets per actor: torch's device 0 is that list's first entry."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return nvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    device = visible[torch.cuda.current_device()]
    if device.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(device))
    return nvml.nvmlDeviceGetHandleByUUID(device)  # GPU-... or MIG-... ids


class GpuSampler:
    """``keep=False`` keeps only the running mean (``mean_busy``), for a sampler that runs all
    night: no list that grows, no scan of it per batch."""

    def __init__(self, period_s: float = 0.02, keep: bool = True):
        self.period_s = period_s
        self.keep = keep
        self.samples: list[tuple[float, int, int]] = []  # (time, utilisation %, bytes used)
        self._util_sum, self._count = 0, 0
        self._stop = threading.Event()
        self._handle = None
        if torch.cuda.is_available():
            import pynvml  # nvidia-ml-py, a dependency: without it a GPU run would have no busy figures

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = _nvml_handle(pynvml)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> GpuSampler:
        if self._handle is not None and not self._thread.is_alive():
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> GpuSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
            self._util_sum, self._count = self._util_sum + util, self._count + 1
            if self.keep:
                used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
                self.samples.append((time.time(), util, used))

    def busy(self, start: float, end: float) -> float | None:
        """The GPU's mean utilisation between ``start`` and ``end`` (time.time()), as a share."""
        window = [u for t, u, _ in self.samples if start <= t <= end]
        return round(sum(window) / len(window) / 100, 3) if window else None

    def mean_busy(self) -> float | None:
        """The GPU's mean utilisation since the sampler started, as a share."""
        return round(self._util_sum / self._count / 100, 3) if self._count else None

    def peak_gb(self) -> float | None:
        return round(max(m for _, _, m in self.samples) / 2**30, 2) if self.samples else None
