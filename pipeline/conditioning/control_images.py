"""Control images, on CPU in the prepare step: read from the manifest (`control_image` for a
stage's first ControlNet, `control_image_2` for its second, ...; the same forms, URI rules and
header-first limits as `image`) or computed from the row's `image` (`control: {kind: canny}`).
Each must be the size of the image the flow's first stage makes; a problem is the row's error,
naming the column. They travel to the stages as PNG bytes (which keep their size) in internal
columns.

Kinds computed here: canny (OpenCV, the `control` extra). Depth, normals, pose, line art and
segmentation maps need their own estimator models and are read from the manifest instead.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline import columns
from pipeline.access import Access
from pipeline.images import InputError, decode
from pipeline.spec import ControlSpec, LimitsSpec, StageSpec, StorageSpec

COLUMN = "control_image"


def column(k: int) -> str:
    """The manifest column of the k-th ControlNet's control image."""
    return COLUMN if k == 0 else f"{COLUMN}_{k + 1}"


def count(flow: list[StageSpec]) -> int:
    """How many control images a row of ``flow`` needs: the most of any stage (one per ControlNet,
    one for a T2I-Adapter)."""
    return max((stage.control_models for stage in flow), default=0)


def maker(flow: list[StageSpec]) -> ControlSpec | None:
    return next((stage.control for stage in flow if stage.control), None)


def canny(image: np.ndarray, spec: ControlSpec) -> np.ndarray:
    """White edges on black, as the Canny ControlNets were trained on (OpenCV's Canny)."""
    try:
        import cv2
    except ImportError:
        raise InputError("control: kind canny needs OpenCV: pip install 'shardgen[control]'") from None
    edges = cv2.Canny(np.asarray(Image.fromarray(image).convert("L")), spec.low_threshold, spec.high_threshold)
    return np.repeat(edges[..., None], 3, axis=2)


MAKERS = {"canny": canny}


def encode(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def unpack(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def row_controls(cols: dict[str, list], i: int, flow: list[StageSpec], image: np.ndarray | None, width: int | None,
                 height: int | None, storage: StorageSpec, access: Access, limits: LimitsSpec) -> list[bytes | None]:
    """Row ``i``'s control images as PNG bytes, one per column the flow reads; InputError names the
    column of a missing, unreadable or wrong-sized one. A column no stage needs is read when given
    (a saved ControlNet pipeline named as the model takes it)."""
    needed, made = count(flow), maker(flow)
    out: list[bytes | None] = []
    for k in range(max(needed, 1)):
        name = column(k)
        if k == 0 and made is not None:
            source = image if image is not None else decode("image", cols["image"][i], "RGB", storage, access, limits)
            control = MAKERS[made.kind](source, made)
        elif k < needed or cols[name][i] is not None:
            control = decode(name, cols[name][i], "RGB", storage, access, limits)
        else:
            out.append(None)
            continue
        if width is not None and control.shape[:2] != (height, width):
            raise InputError(f"{name}: size {control.shape[1]}x{control.shape[0]} differs from the "
                             f"{width}x{height} image the stage makes")
        out.append(encode(control))
    return out


def internal(k: int) -> str:
    return f"{columns.CONTROL_PREFIX}{k}"


def manifest_columns(flow: list[StageSpec]) -> list[str]:
    """The control columns a manifest must have for ``flow`` (none for an image made by `control`)."""
    first = 1 if maker(flow) else 0
    return [column(k) for k in range(first, count(flow))]
