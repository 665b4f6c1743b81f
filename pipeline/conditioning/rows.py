"""What the prepare step does for conditioning, per row: the control images (control_images.py),
the reference image of an IP-Adapter, the LoRA adapters the row's `lora` column picks, and its
`controlnet_scale`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import columns
from pipeline.access import Access
from pipeline.conditioning import control_images, ip_adapter, lora
from pipeline.images import decode
from pipeline.spec import LimitsSpec, StageSpec, StorageSpec


def manifest_names(flow: list[StageSpec]) -> list[str]:
    """The manifest columns the conditioning of ``flow`` reads (absent ones read as nulls)."""
    return ["lora", "controlnet_scale", ip_adapter.COLUMN,
            *(control_images.column(k) for k in range(max(control_images.count(flow), 1)))]


def manifest_columns(flow: list[StageSpec]) -> list[str]:
    """The conditioning columns a manifest must have for ``flow``."""
    references = [ip_adapter.COLUMN] if any(stage.ip_adapter for stage in flow) else []
    return control_images.manifest_columns(flow) + references


@dataclass
class RowConditioning:
    controls: list[bytes | None]
    lora: str
    reference: bytes | None


def row(cols: dict[str, list], i: int, flow: list[StageSpec], lora_given: bool, image: np.ndarray | None,
        width: int | None, height: int | None, storage: StorageSpec, access: Access,
        limits: LimitsSpec) -> RowConditioning:
    """Row ``i``'s conditioning inputs; InputError names the column of a bad one."""
    controls = control_images.row_controls(cols, i, flow, image, width, height, storage, access, limits)
    reference = None
    if any(stage.ip_adapter for stage in flow):  # any size: the adapter's image encoder resizes it
        reference = control_images.encode(decode(ip_adapter.COLUMN, cols[ip_adapter.COLUMN][i], "RGB", storage,
                                                 access, limits))
    return RowConditioning(controls, lora.row_choice(cols["lora"][i], flow[0], lora_given), reference)


def filled(flow: list[StageSpec], rows: list[RowConditioning | None], cols: dict[str, list],
           given: set[str]) -> list[tuple]:
    """The columns the stages read, (name, values, type) each; only those that carry something, so
    that a job without conditioning keeps its output columns (a stage reads an absent one as unset)."""
    out = []
    for k in range(max(control_images.count(flow), 1)):
        images = [r.controls[k] if r else None for r in rows]
        if any(image is not None for image in images):
            out.append((control_images.internal(k), images, pa.binary()))
    if any(r and r.reference is not None for r in rows):
        out.append((columns.REFERENCE_IMAGE, [r.reference if r else None for r in rows], pa.binary()))
    if lora.selectable(flow[0]):
        out.append((columns.LORA, [r.lora if r else None for r in rows], pa.string()))
    if "controlnet_scale" in given:
        out.append(("controlnet_scale", [flow[0].controlnet_scale if v is None else float(v)
                                         for v in cols["controlnet_scale"]], pa.float64()))
    return out
