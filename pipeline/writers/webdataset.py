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


def _extension_of(row: dict, column: str) -> str:
    try:
        return image_extension(row[column])
    except ValueError as e:
        raise ValueError(f"row {row['id']!r}: column {column!r}: {e}, "
                         "though the column's first value is an image") from None


def _image_columns(table: pa.Table) -> dict[str, str]:
    """The columns besides `image` that hold image bytes, each with its members' extension, judged
    by the column's first value: one layout for every sample of a tar, which `datasets` needs."""
    found = {}
    for field in table.schema:
        if field.name in NOT_IN_JSON or not (pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)):
            continue
        values = table.column(field.name).drop_null()
        try:
            if len(values):
                found[field.name] = image_extension(values[0].as_py())
        except ValueError:
            continue  # bytes that are no image go into the JSON
    return found


def _json_type(t: pa.DataType) -> pa.DataType:
    """The type a column's values have once in the JSON: what JSON cannot hold (timestamps,
    bytes) is written as its string (json.dumps' default=str)."""
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_floating(t):
        return pa.float64()
    if pa.types.is_boolean(t) or pa.types.is_string(t):
        return t
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(_json_type(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _json_type(f.type)) for f in t])
    return pa.string()


def sample_schema(table: pa.Table) -> pa.Schema:
    """The fields of each sample as `datasets.load_dataset("webdataset")` reads them: image members
    (binary, named by their extension), `cls`, `json` (a struct of the other columns) and the
    `__key__`/`__url__` the reader adds."""
    images = _image_columns(table)
    ext = image_extension(table.column("image")[0]["bytes"].as_py())
    fields = [pa.field(ext, pa.binary())]
    if LABEL_COLUMN in table.column_names:
        fields.append(pa.field("cls", pa.int64()))
    fields += [pa.field(f"{name}.{e}", pa.binary()) for name, e in images.items()]
    meta = [pa.field(f.name, _json_type(f.type)) for f in table.schema
            if f.name not in NOT_IN_JSON and f.name not in images]
    return pa.schema(fields + [pa.field("json", pa.struct(sorted(meta, key=lambda f: f.name))),
                               pa.field("__key__", pa.string()), pa.field("__url__", pa.string())])


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # the same rows make the same bytes
    tar.addfile(info, io.BytesIO(payload))


class WebDatasetWriter(FormatWriter):
    suffix = ".tar"

    def encode(self, table: pa.Table) -> bytes:
        images = _image_columns(table)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for row in table.to_pylist():
                key = sample_key(row["id"])
                image = row["image"]["bytes"]
                _add(tar, f"{key}.{image_extension(image)}", image)
                if row.get(LABEL_COLUMN) is not None:
                    _add(tar, f"{key}.cls", str(int(row[LABEL_COLUMN])).encode())
                for column in images:
                    if row[column] is not None:
                        _add(tar, f"{key}.{column}.{_extension_of(row, column)}", row[column])
                meta = {k: v for k, v in row.items() if k not in NOT_IN_JSON and k not in images}
                _add(tar, f"{key}.json", json.dumps(meta, default=str, sort_keys=True).encode())
        return buf.getvalue()
