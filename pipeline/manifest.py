"""Manifest checks that run on the driver before any model loads.

Job-level problems (a missing or mistyped column, null or duplicate ids) stop the job: nothing
useful could come out of it. Row-level problems (an empty prompt, a bad size) are left to the
prepare step, which turns each such row into an error row while the others go on.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline import storage
from pipeline.errors import ManifestError
from pipeline.kinds import KINDS
from pipeline.spec import JobSpec


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
    "reference_images": ("list of bytes, struct{bytes, path} or URI strings", _is_image_list_type),
}


def open_manifest(spec: JobSpec) -> pads.Dataset:
    fs, path = storage.arrow_filesystem(spec.manifest, spec.storage)
    try:
        with storage.guard("read manifest", spec.manifest, spec.storage):
            return pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=False)
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as err:
        raise ManifestError(storage.redact(f"cannot read manifest {spec.manifest}: {err}", spec.storage)) from None


def source(spec: JobSpec, name: str) -> str:
    """The manifest's own name for the column shardgen calls ``name`` (the spec's `columns:`)."""
    return spec.columns.get(name, name)


def _check_mapping(spec: JobSpec, names: list[str]) -> None:
    for name, column in spec.columns.items():
        if column not in names:
            raise ManifestError(f"columns.{name}: manifest {spec.manifest} has no column {column!r}; it has {names}")
        if name in names and name not in spec.columns.values():
            raise ManifestError(f"columns.{name}: manifest {spec.manifest} has both {column!r} and {name!r}; "
                                f"map {name!r} to one of them only (or rename the other)")


def mapped_names(spec: JobSpec, names: list[str]) -> list[str]:
    """The manifest's column names as shardgen reads them, after the spec's `columns:`."""
    renamed = {column: name for name, column in spec.columns.items()}
    return [renamed.get(n, n) for n in names]


def check(spec: JobSpec) -> pa.Array:
    """Check the manifest's columns and ids; return the ids or raise ManifestError."""
    dataset = open_manifest(spec)
    schema = dataset.schema
    _check_mapping(spec, schema.names)
    names = mapped_names(spec, schema.names)
    required = ["id", "task"] if spec.flows is not None else ["id"]
    # Only a flow's first stage reads the manifest; later stages take the previous stage's output.
    for flow in spec.flow_map().values():
        required += [c for c in KINDS[flow[0].kind].manifest_columns if c not in required]
    missing = [c for c in required if c not in names]
    if missing:
        raise ManifestError(
            f"manifest {spec.manifest} lacks required column(s) {missing} "
            f"(the job needs {required}); it has {schema.names}"
            + ("" if spec.columns else "; a column of another name maps with `columns:` in the spec, "
               f"e.g. columns: {{{missing[0]}: YOUR_COLUMN}}")
        )
    for name, (expected, ok) in COLUMN_TYPES.items():
        column = source(spec, name)
        if name in names and not ok(schema.field(column).type):
            shown = repr(name) if column == name else f"{name!r} ({column!r} in the manifest)"
            raise ManifestError(f"manifest column {shown} must be {expected}, got {schema.field(column).type}")
    with storage.guard("read manifest", spec.manifest, spec.storage):
        ids = dataset.to_table(columns=[source(spec, "id")]).column(0)
    if len(ids) == 0:
        raise ManifestError(f"manifest {spec.manifest} has no rows")
    if ids.null_count:
        raise ManifestError(f"manifest column 'id' has {ids.null_count} null value(s)")
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        dup = [v["values"] for v in counts.to_pylist() if v["counts"] > 1]
        shown = ", ".join(repr(d) for d in dup[:10]) + (" ..." if len(dup) > 10 else "")
        raise ManifestError(f"manifest column 'id' has {len(dup)} duplicate id(s): {shown}")
    return ids.combine_chunks()


def read(spec: JobSpec, names: list[str] | None = None, rows: int | None = None) -> pa.Table:
    """The manifest's columns ``names`` (those it has; None: all), under shardgen's names, all rows
    or the first ``rows``."""
    dataset = open_manifest(spec)
    have = mapped_names(spec, dataset.schema.names)
    columns = None if names is None else [source(spec, n) for n in names if n in have]
    with storage.guard("read manifest", spec.manifest, spec.storage):
        table = dataset.head(rows, columns=columns) if rows is not None else dataset.to_table(columns=columns)
    return table.rename_columns(mapped_names(spec, table.column_names))


def ids_and_tasks(spec: JobSpec) -> list[tuple[str, str | None]]:
    table = read(spec, ["id", "task"])
    return list(zip(table.column("id").to_pylist(), table.column("task").to_pylist()))
