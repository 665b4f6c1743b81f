"""Manifest checks that run on the driver before any model loads.

Job-level problems (a missing or mistyped column, null or duplicate ids) stop the job: nothing
useful could come out of it. Row-level problems (an empty prompt, a bad size) are left to the
prepare step, which turns each such row into an error row while the others go on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline import columns, id_checks, storage
from pipeline.conditioning import rows as conditioning
from pipeline.errors import ManifestError
from pipeline.kinds import KINDS
from pipeline.output_schema import RESERVED, SOURCE_PREFIX
from pipeline.spec import JobSpec, OverrideColumn


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return t.get_field_index("bytes") >= 0
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_image_list_type(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_image_type(t.value_type)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


COLUMN_TYPES: dict[str, tuple[str, Callable[[pa.DataType], bool]]] = {
    "id": ("string", _is_text),
    "task": ("string", _is_text),
    "prompt": ("string", _is_text),
    "negative_prompt": ("string", _is_text),
    "seed": ("integer", pa.types.is_integer),
    "steps": ("integer", pa.types.is_integer),
    "width": ("integer", pa.types.is_integer),
    "height": ("integer", pa.types.is_integer),
    "guidance_scale": ("number", lambda t: pa.types.is_floating(t) or pa.types.is_integer(t)),
    "strength": ("number", lambda t: pa.types.is_floating(t) or pa.types.is_integer(t)),
    "image": ("bytes, struct{bytes, path} or URI string", _is_image_type),
    "mask": ("bytes, struct{bytes, path} or URI string", _is_image_type),
    "control_image": ("bytes, struct{bytes, path} or URI string", _is_image_type),
    "reference_image": ("bytes, struct{bytes, path} or URI string", _is_image_type),
    "lora": ("string", _is_text),
    "controlnet_scale": ("number", lambda t: pa.types.is_floating(t) or pa.types.is_integer(t)),
    "reference_images": ("list of bytes, struct{bytes, path} or URI strings", _is_image_list_type),
}


def open_manifest(spec: JobSpec) -> pads.Dataset:
    fs, path = storage.arrow_filesystem(spec.manifest, spec.storage)
    try:
        with storage.guard("read manifest", spec.manifest, spec.storage):
            return pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=False)
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as err:
        raise ManifestError(storage.redact(f"cannot read manifest {spec.manifest}: {_reason(err, path)}",
                                           spec.storage)) from None


def _reason(err: Exception, path: str) -> str:
    """Why a manifest could not be read, in words: an OSError's text is often just the path."""
    if isinstance(err, FileNotFoundError):
        return "no such file or folder"
    if isinstance(err, PermissionError):
        return "permission denied"
    text = str(err)
    return type(err).__name__ if text in ("", path, repr(path)) else text


def source(spec: JobSpec, name: str) -> str:
    """The manifest's own name for the column shardgen calls ``name`` (the spec's `columns:`)."""
    return spec.columns.get(name, name)


def overrides(spec: JobSpec) -> list[str]:
    """The generation parameters the manifest sets per row: `overrides:` and those `columns:` maps."""
    mapped = [name for name in spec.columns if name in get_args(OverrideColumn)]
    return sorted(set(spec.overrides) | set(mapped))


def _inputs(spec: JobSpec) -> set[str]:
    """The shardgen names read from the manifest: the row's inputs its flows take, and the overrides."""
    firsts = [KINDS[flow[0].kind] for flow in spec.flow_map().values()]
    taken = {name for kind in firsts for name in kind.inputs}
    return {"id", "task", "prompt", "negative_prompt", "seed"} | (taken & {"image", "mask"}) | set(overrides(spec))


def read_names(spec: JobSpec, names: list[str]) -> dict[str, str]:
    """Each manifest column's name in the pipeline and the output: the `columns:` mapping's name,
    its own name where shardgen reads it or where the output has no column of that name, and
    otherwise SOURCE_PREFIX + its own name (a caption set's `width` is kept as `source_width`)."""
    renamed = {column: name for name, column in spec.columns.items()}
    read = _inputs(spec) - set(spec.columns)
    result = {}
    for n in names:
        if n in renamed:
            result[n] = renamed[n]
        elif n in read or not (n in RESERVED or n.startswith(columns.INTERNAL_PREFIX)):
            result[n] = n
        else:
            result[n] = SOURCE_PREFIX + n
    return result


def _check_mapping(spec: JobSpec, names: list[str]) -> None:
    for name, column in spec.columns.items():
        if column not in names:
            raise ManifestError(f"columns.{name}: manifest {spec.manifest} has no column {column!r}; it has {names}")
    for name in spec.overrides:
        if name not in names:
            raise ManifestError(f"overrides: manifest {spec.manifest} has no column {name!r}; it has {names}")
    seen: dict[str, str] = {}
    for column, name in read_names(spec, names).items():
        if name in seen:
            raise ManifestError(f"manifest {spec.manifest}: columns {seen[name]!r} and {column!r} would both be "
                                f"{name!r} in the output; rename one of them")
        seen[name] = column


def mapped_names(spec: JobSpec, names: list[str]) -> list[str]:
    """The manifest's column names as shardgen reads them (read_names), in the manifest's order."""
    renamed = read_names(spec, names)
    return [renamed[n] for n in names]


def check(spec: JobSpec) -> int:
    """Check the manifest's columns and ids (streamed: pipeline/id_checks.py); return its row
    count or raise ManifestError."""
    dataset = open_manifest(spec)
    schema = dataset.schema
    _check_mapping(spec, schema.names)
    names = mapped_names(spec, schema.names)
    required = ["id", "task"] if spec.flows is not None else ["id"]
    # Only a flow's first stage reads the manifest; later stages take the previous stage's output.
    for flow in spec.flow_map().values():
        required += [c for c in KINDS[flow[0].kind].manifest_columns if c not in required]
        required += [c for c in conditioning.manifest_columns(flow) if c not in required]
    missing = [c for c in required if c not in names]
    if missing:
        raise ManifestError(
            f"manifest {spec.manifest} lacks required column(s) {missing} "
            f"(the job needs {required}); it has {schema.names}"
            + ("" if spec.columns else "; a column of another name maps with `columns:` in the spec, "
               f"e.g. columns: {{{missing[0]}: YOUR_COLUMN}}")
        )
    for column, name in read_names(spec, schema.names).items():
        if name not in COLUMN_TYPES:
            continue
        expected, ok = COLUMN_TYPES[name]
        if not ok(schema.field(column).type):
            shown = repr(name) if column == name else f"{name!r} ({column!r} in the manifest)"
            raise ManifestError(f"manifest column {shown} must be {expected}, got {schema.field(column).type}")
    with storage.guard("read manifest", spec.manifest, spec.storage):
        counts = id_checks.count_ids(id_batches(spec, dataset))
    if counts.rows == 0:
        raise ManifestError(f"manifest {spec.manifest} has no rows")
    if counts.nulls:
        raise ManifestError(f"manifest column 'id' has {counts.nulls} null value(s)")
    if counts.duplicated:
        more = " ..." if counts.duplicated > len(counts.examples) else ""
        shown = ", ".join(repr(d) for d in counts.examples) + more
        raise ManifestError(f"manifest column 'id' has {counts.duplicated} duplicate id(s): {shown}")
    return counts.rows


def _streamed() -> pads.ParquetFragmentScanOptions:
    """Parquet read a buffer at a time, not a whole row group's column at once: what streams
    from the manifest does not grow with its row groups' size (a 1M-row group held 300 MB)."""
    return pads.ParquetFragmentScanOptions(pre_buffer=False, use_buffered_stream=True,
                                           buffer_size=id_checks.READ_BUFFER)


def id_batches(spec: JobSpec, dataset: pads.Dataset | None = None) -> pa.RecordBatchReader:
    """The manifest's ids as a stream of batches of one column, ``id`` (one batch read ahead)."""
    dataset = dataset or open_manifest(spec)
    return dataset.scanner(columns={"id": pc.field(source(spec, "id"))}, batch_size=id_checks.BATCH_ROWS,
                           batch_readahead=1, fragment_readahead=1, fragment_scan_options=_streamed()).to_reader()


def read(spec: JobSpec, names: list[str] | None = None, rows: int | None = None) -> pa.Table:
    """The manifest's columns ``names`` (those it has; None: all), under shardgen's names, all rows
    or the first ``rows``."""
    dataset = open_manifest(spec)
    have = mapped_names(spec, dataset.schema.names)
    columns = None if names is None else [source(spec, n) for n in names if n in have]
    with storage.guard("read manifest", spec.manifest, spec.storage):
        table = dataset.scanner(columns=columns, batch_size=max(rows, 1), batch_readahead=1, fragment_readahead=1,
                                fragment_scan_options=_streamed()).head(rows) if rows is not None \
            else dataset.to_table(columns=columns)
    return table.rename_columns(mapped_names(spec, table.column_names))
