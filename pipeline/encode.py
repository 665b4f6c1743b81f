"""CPU step after the GPU stages: image arrays to encoded bytes and their sha256."""

from __future__ import annotations

import hashlib
import io
import re
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline import columns
from pipeline.spec import FormatSpec
from pipeline.tables import raw_images, values, with_column

EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}
PIL_FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}


def encode_image(image: np.ndarray, fmt: FormatSpec) -> bytes:
    buf = io.BytesIO()
    if fmt.image == "png":
        options = {"compress_level": fmt.png_compress_level}
    elif fmt.image == "webp" and fmt.quality == 100:
        options = {"lossless": True}
    else:
        options = {"quality": fmt.quality}
    Image.fromarray(image).save(buf, format=PIL_FORMATS[fmt.image], **options)
    return buf.getvalue()


# Seconds to encode one pixel on one core (PIL, measured at 512x512: PNG level 1 21 ms, level 6
# 53 ms, WebP/JPEG well under PNG 6): the estimate that sizes encode bundles by time.
SECONDS_PER_PIXEL = {"png": 0.8e-7, "webp": 2.0e-7, "jpeg": 0.3e-7}
PNG_SLOW_LEVEL = 6  # levels above 1 cost about as much as PIL's default 6, or more


def seconds_per_image(pixels: int, fmt: FormatSpec) -> float:
    """About how long one image of ``pixels`` pixels takes to encode on one core."""
    rate = SECONDS_PER_PIXEL[fmt.image]
    if fmt.image == "png" and fmt.png_compress_level > 1:
        rate *= 2.5
    return pixels * rate


SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def image_name(row_id: str, fmt: FormatSpec) -> str:
    """The struct's ``path``: a label only (no file is written under it), but readers may join it
    to a folder, so it is always one plain file name. An id that is not one already (separators,
    ``..``, a leading dot, other characters, over 100 characters) is sanitised and gets a hash of
    itself, so that two ids never share a name."""
    if SAFE_NAME.fullmatch(row_id):
        stem = row_id
    else:
        cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", row_id).strip("_")[:80]
        stem = f"{cleaned}-{hashlib.sha256(row_id.encode('utf-8')).hexdigest()[:16]}".lstrip("-")
    return f"{stem}.{EXTENSIONS[fmt.image]}"


def encode_batch(table: pa.Table, fmt: FormatSpec) -> pa.Table:
    data = [None if img is None else encode_image(img, fmt) for img in raw_images(table)]
    names = [None if d is None else image_name(i, fmt) for d, i in zip(data, values(table, "id"))]
    digests = [None if d is None else hashlib.sha256(d).hexdigest() for d in data]
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    # What the sink will not need stays behind here.
    table = table.drop_columns([c for c in (columns.PIXELS, columns.MASK, columns.TEXT_EMBEDS)
                                if c in table.column_names])
    for name, vals, type_ in [
        (columns.IMAGE_BYTES, data, pa.binary()),
        (columns.IMAGE_PATH, names, pa.string()),
        ("image_sha256", digests, pa.string()),
        # Rows no stage made an image for (error rows) are dated here.
        ("created_at", [c or now for c in values(table, "created_at")], pa.timestamp("us")),
    ]:
        table = with_column(table, name, vals, type_)
    return table
