"""What a model folder must be before anything loads it: weights as safetensors only (a pickle can
run code when it is unpickled) and only classes from diffusers and transformers (no custom
pipeline or component code, no Python files). Stages never pass ``trust_remote_code`` or
``custom_pipeline`` to ``from_pretrained``; these checks refuse a folder that would ask for them.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict

from pipeline.errors import ModelError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
LIBRARIES = ("diffusers", "transformers")


def _pickled_only(files: list[str]) -> list[str]:
    """Pickled weight files in folders that hold no safetensors beside them."""
    by_folder: dict[str, list[str]] = defaultdict(list)
    for name in files:
        by_folder[posixpath.dirname(name)].append(name)
    return sorted(
        name for names in by_folder.values() if not any(n.endswith(".safetensors") for n in names)
        for name in names if name.endswith(PICKLE_SUFFIXES)
    )


def _library_allowed(library: str) -> bool:
    from diffusers import pipelines

    # diffusers names its own pipeline sub-modules as libraries too (e.g. "stable_diffusion"), also
    # those it moved under pipelines.deprecated (Würstchen's, whose Paella VQ-GAN Stable Cascade uses).
    return library in LIBRARIES or hasattr(pipelines, library) or hasattr(pipelines.deprecated, library)


def _pipeline_class_allowed(name: object) -> bool:
    import diffusers

    found = getattr(diffusers, name, None) if isinstance(name, str) else None
    return isinstance(found, type) and issubclass(found, diffusers.DiffusionPipeline)


def check_safe_files(field: str, source: str, files: list[str]) -> None:
    """Refuse (ModelError, exit 2) a conditioning model folder (the spec field ``field`` names it)
    that holds pickled weights or Python code."""
    if _pickled_only(files) or any(f.endswith(".py") for f in files):
        raise ModelError(f"{field}: {source} holds pickled weights or Python code; shardgen loads safetensors "
                         "only and runs no code from model folders")


def check_model(source: str, files: list[str], model_index: dict | None) -> None:
    """Refuse (ModelError, exit 2) the model at ``source`` whose relative file names are ``files``
    and whose model_index.json holds ``model_index`` (None when it has none)."""
    pickled = _pickled_only(files)
    if pickled:
        shown = ", ".join(pickled[:5]) + (" ..." if len(pickled) > 5 else "")
        raise ModelError(
            f"model: {source} holds weights only as pickles ({shown}); shardgen loads safetensors only "
            "(re-save the model with save_pretrained(..., safe_serialization=True))"
        )
    code = sorted(f for f in files if f.endswith(".py"))
    if code:
        raise ModelError(f"model: {source} ships Python code ({', '.join(code[:5])}); shardgen runs no code from "
                         "model folders")
    if model_index is None:
        raise ModelError(f"model: {source} has no model_index.json: it is not a diffusers pipeline folder")
    if not _pipeline_class_allowed(model_index.get("_class_name")):
        raise ModelError(f"model: {source}: model_index.json names the pipeline {model_index.get('_class_name')!r}, "
                         "which is not a diffusers pipeline; shardgen runs no custom pipelines")
    for component, value in model_index.items():
        if component.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        library, class_name = value
        if not isinstance(library, str) or not _library_allowed(library):
            raise ModelError(f"model: {source}: model_index.json names {component}: {library}.{class_name}, a class "
                             "outside diffusers and transformers; shardgen loads no custom code")
