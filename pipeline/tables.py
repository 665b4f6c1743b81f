"""Small helpers for the pyarrow tables that flow between steps.

Every step takes and returns a pyarrow table, so pass-through columns keep their exact types
(a nullable int64 never becomes a float on the way), and images travel as raw uint8 bytes in a
binary column, shaped by the row's ``height`` and ``width``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import columns


def with_column(table: pa.Table, name: str, values: Any, type: pa.DataType | None = None) -> pa.Table:
    array = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=type)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, array)
    return table.append_column(name, array)


def values(table: pa.Table, name: str, default: Any = None) -> list:
    """A column as Python values (nulls as None), or ``default`` for each row when it is absent."""
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [default] * table.num_rows


def raw_images(table: pa.Table, column: str = columns.PIXELS, channels: int = 3) -> list[np.ndarray | None]:
    """Each row's image in ``column`` as a uint8 array of the row's height and width (None where the
    row has none): HxWx3 images by default, HxW masks with ``channels=1``."""
    shape = (lambda h, w: (h, w, channels)) if channels > 1 else (lambda h, w: (h, w))
    return [
        None if data is None else np.frombuffer(data, dtype=np.uint8).reshape(shape(h, w))
        for data, h, w in zip(values(table, column), values(table, "height"), values(table, "width"))
    ]


def with_pixels(table: pa.Table, images: list[np.ndarray | None]) -> pa.Table:
    """Store images as raw bytes and set ``height``/``width`` to their sizes."""
    heights = [img.shape[0] if img is not None else h for img, h in zip(images, values(table, "height"))]
    widths = [img.shape[1] if img is not None else w for img, w in zip(images, values(table, "width"))]
    data = [None if img is None else np.ascontiguousarray(img, dtype=np.uint8).tobytes() for img in images]
    table = with_column(table, columns.PIXELS, data, pa.binary())
    table = with_column(table, "height", heights, pa.int64())
    return with_column(table, "width", widths, pa.int64())
