"""The random generator of a row in a stage: what makes a row's image depend on its seed alone."""

from __future__ import annotations

import torch


def row_generator(seed: int, position: int = 0) -> torch.Generator:
    """A CPU generator per row and stage: a row's noise depends on its seed and the stage's place
    in the chain alone, on any device and in any batch."""
    mixed = (int(seed) + position * 0x9E3779B97F4A7C15) % (1 << 63)
    return torch.Generator("cpu").manual_seed(mixed)
