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
        options = {}
    elif fmt.image == "webp" and fmt.quality == 100:
        options = {"lossless": True}
    else:
        options = {"quality": fmt.quality}
    Image.fromarray(image).save(buf, format=PIL_FORMATS[fmt.image], **options)
    return buf.getvalue()


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
