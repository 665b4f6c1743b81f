"""One module per stage kind (pipeline/stages/<kind>.py); stage_class maps a spec's ``kind`` to its
class, as named in pipeline/kinds.py."""

from __future__ import annotations

import importlib

from pipeline.kinds import KINDS


def stage_class(kind: str):
    # Imported on demand: a stage module pulls in torch and diffusers, which the driver of a
    # cluster job need not load.
    return getattr(importlib.import_module(f"pipeline.stages.{kind}"), KINDS[kind].stage_class)
