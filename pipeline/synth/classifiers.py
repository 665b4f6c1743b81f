"""Classifiers for the confidence filter: a model that takes images and returns class
probabilities. ``builtin:shape-classifier`` is the shapes set's (pipeline/models/trained/); a
local folder in the same format (config.json with `shapes`, model.safetensors) also loads."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pipeline.errors import SpecError

TRAINED = Path(__file__).resolve().parent.parent / "models" / "trained"


class Classifier(Protocol):
    names: list[str]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """N x H x W x 3 uint8 images -> N x len(names) probabilities."""


class ShapeProbabilities:
    """The trained shape classifier (pipeline.training.classifier), as probabilities."""

    def __init__(self, folder: Path):
        from pipeline.training.classifier import ShapeClassifier

        self._classifier = ShapeClassifier(folder)
        self.names = list(self._classifier.shapes)

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        from pipeline.training.classifier import alpha_maps

        logits = self._classifier.model(torch.from_numpy(alpha_maps(images)))
        return torch.softmax(logits, dim=1).numpy()


def load_classifier(model: str) -> Classifier:
    folder = TRAINED / model.removeprefix("builtin:") if model.startswith("builtin:") else Path(model)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise SpecError(f"filters.confidence.model: {model} is not a classifier folder (config.json and "
                        f"model.safetensors; built-in: builtin:shape-classifier)")
    return ShapeProbabilities(folder)
