"""CPU step after the GPU stages: image arrays to encoded bytes, their sha256 and size."""

from __future__ import annotations

import hashlib
import io
import re
from datetime import datetime, timezone

import numpy as np
from PIL import Image

from pipeline import columns
from pipeline.spec import FormatSpec

EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}
PIL_FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}


def encode_image(pixels: np.ndarray, fmt: FormatSpec) -> bytes:
    buf = io.BytesIO()
    options = {} if fmt.image == "png" else {"quality": fmt.quality}
    if fmt.image == "webp" and fmt.quality == 100:
        options = {"lossless": True}
    Image.fromarray(pixels).save(buf, format=PIL_FORMATS[fmt.image], **options)
    return buf.getvalue()


def image_name(row_id: str, fmt: FormatSpec) -> str:
    # The struct's path is a label only (no file is written under it); keep it a plain file name.
    return re.sub(r"[^A-Za-z0-9._-]", "_", row_id) + "." + EXTENSIONS[fmt.image]


def encode_batch(batch: dict[str, np.ndarray], fmt: FormatSpec) -> dict[str, np.ndarray]:
    n = len(batch["id"])
    data, names, digests = [None] * n, [None] * n, [None] * n
    width, height = batch["width"].copy(), batch["height"].copy()
    for i in range(n):
        pixels = batch[columns.PIXELS][i]
        if batch["status"][i] != "ok" or pixels.size == 0:
            continue
        data[i] = encode_image(pixels, fmt)
        names[i] = image_name(str(batch["id"][i]), fmt)
        digests[i] = hashlib.sha256(data[i]).hexdigest()
        height[i], width[i] = pixels.shape[:2]
    del batch[columns.PIXELS]
    batch.update({
        columns.IMAGE_BYTES: np.array(data, dtype=object),
        columns.IMAGE_PATH: np.array(names, dtype=object),
        "image_sha256": np.array(digests, dtype=object),
        "width": width,
        "height": height,
        "created_at": np.array([datetime.now(timezone.utc).replace(tzinfo=None)] * n, dtype="datetime64[us]"),
    })
    return batch
