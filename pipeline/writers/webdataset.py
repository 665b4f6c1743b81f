"""WebDataset shards: tar files whose members are grouped by key, `key.png` (the image, `.webp` or
`.jpg` for those formats), `key.cls` (the integer label, when the rows have one), `key.COLUMN.png`
for each other column of image bytes (a segmentation recipe's `label_map`: the mask beside the
image) and `key.json` (every other column), as the `webdataset` package and
`datasets.load_dataset("webdataset")` read."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile

import pyarrow as pa

from pipeline.writers.base import FormatWriter

LABEL_COLUMN = "label"
# Members of the tar; the image and the label are members of their own, not JSON fields.
NOT_IN_JSON = ("image", LABEL_COLUMN)


def sample_key(row_id: str) -> str:
    """A tar member key for a row id: webdataset cuts keys at the first '.' and treats '/' as
    folders, so anything but letters, digits, '-' and '_' is replaced, and a hash of the id keeps
    two ids that read the same after that apart."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", row_id)
    return safe if safe == row_id else f"{safe}_{hashlib.sha1(row_id.encode()).hexdigest()[:8]}"


def image_extension(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    raise ValueError("image bytes are neither PNG, WebP nor JPEG")


def _is_image(value) -> bool:
    try:
        return isinstance(value, bytes) and bool(image_extension(value))
    except ValueError:
        return False


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # the same rows make the same bytes
    tar.addfile(info, io.BytesIO(payload))


class WebDatasetWriter(FormatWriter):
    suffix = ".tar"

    def encode(self, table: pa.Table) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for row in table.to_pylist():
                key = sample_key(row["id"])
                image = row["image"]["bytes"]
                _add(tar, f"{key}.{image_extension(image)}", image)
                if row.get(LABEL_COLUMN) is not None:
                    _add(tar, f"{key}.cls", str(int(row[LABEL_COLUMN])).encode())
                images = {k: v for k, v in row.items() if k not in NOT_IN_JSON and _is_image(v)}
                for column, data in images.items():
                    _add(tar, f"{key}.{column}.{image_extension(data)}", data)
                meta = {k: v for k, v in row.items() if k not in NOT_IN_JSON and k not in images}
                _add(tar, f"{key}.json", json.dumps(meta, default=str, sort_keys=True).encode())
        return buf.getvalue()
