"""`shardgen manifest from FILE`: a text file of prompts (one a line), CSV or JSONL to a Parquet
manifest, on local paths and object storage alike.

Every column of the file is kept. A file without an `id` column gets ids made from each row's line
number and content (``L000012-<sha256>``), so converting the same file again gives the same ids,
and so the same seeds and images. Seeds are optional: a `seed` column is kept, and rows without
one get a seed derived from their id when they run.
"""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import ManifestError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}


def row_id(line: int, content: str) -> str:
    """A row's id from its line number (1-based) and content: stable across conversions."""
    return f"L{line:06d}-{hashlib.sha256(f'{line}:{content}'.encode()).hexdigest()[:12]}"


def _text(data: bytes) -> tuple[pa.Table, list[int]]:
    """One prompt a line; blank lines are skipped but keep their place in the numbering."""
    lines = data.decode("utf-8-sig").splitlines()
    kept = [(n, line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]
    return pa.table({"prompt": pa.array([p for _, p in kept], pa.string())}), [n for n, _ in kept]


def _table(uri: str, data: bytes) -> tuple[pa.Table, list[int]]:
    """The file as a table, and the line number of each row (the header is line 1 of a CSV)."""
    lower = uri.lower()
    try:
        if lower.endswith(JSONL_SUFFIXES):
            table = pajson.read_json(io.BytesIO(data))
            numbers = [n for n, line in enumerate(data.decode("utf-8-sig").splitlines(), start=1) if line.strip()]
            return table, numbers
        for suffix, delimiter in CSV_SUFFIXES.items():
            if lower.endswith(suffix):
                table = pacsv.read_csv(io.BytesIO(data), parse_options=pacsv.ParseOptions(delimiter=delimiter,
                                                                                         newlines_in_values=True))
                return table, list(range(2, table.num_rows + 2))
    except pa.ArrowInvalid as err:
        raise ManifestError(f"cannot read {uri}: {err}") from None
    return _text(data)


def convert(uri: str, data: bytes) -> pa.Table:
    """The manifest for the file at ``uri`` whose bytes are ``data``."""
    table, numbers = _table(uri, data)
    if table.num_rows == 0:
        raise ManifestError(f"{uri} has no rows")
    if "id" in table.column_names:
        ids = table.column("id").cast(pa.string())
        if ids.null_count:
            raise ManifestError(f"{uri}: column 'id' has {ids.null_count} empty value(s)")
        return table.set_column(table.column_names.index("id"), "id", ids)
    rows = table.to_pylist()
    contents = [json.dumps(row, sort_keys=True, default=str) for row in rows]
    ids = [row_id(n, c) for n, c in zip(numbers, contents)]
    return table.add_column(0, "id", pa.array(ids, pa.string()))


def default_output(uri: str) -> str:
    stem = uri.rsplit("/", 1)[-1]
    base = uri[: len(uri) - len(stem)]
    return base + (stem.rsplit(".", 1)[0] if "." in stem else stem) + ".parquet"


def manifest_from(uri: str, output: str | None = None, log=print) -> str:
    """Convert the file at ``uri`` and write the manifest to ``output``; return where it went."""
    output = output or default_output(uri)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise ManifestError(f"no file at {uri}") from None
    table = convert(uri, data)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    storage.write_bytes(output, buf.getvalue().to_pybytes())
    hint = "" if "prompt" in table.column_names else (
        "; it has no 'prompt' column: name yours in the job spec, e.g. columns: {prompt: caption}")
    log(f"shardgen: wrote {table.num_rows} rows with columns {table.column_names} to {output}{hint}")
    return output
