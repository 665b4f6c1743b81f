"""The output schema: the fixed columns of every output row, in order (docs/contract.md), and the
shaping of a pipeline table into it. Pass-through manifest columns follow the fixed ones."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import columns

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", IMAGE_TYPE),
    ("status", pa.string()),
    ("error", pa.string()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("seed", pa.int64()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("steps", pa.int64()),
    ("guidance_scale", pa.float64()),
    ("strength", pa.float64()),
    ("model", pa.string()),
    ("scheduler", pa.string()),
    ("stages", pa.list_(pa.string())),
    ("stage_params", pa.string()),
    ("image_sha256", pa.string()),
    ("elapsed_s", pa.float64()),
    ("created_at", pa.timestamp("us")),
])
# Input columns that the generated image replaces.
CONSUMED_INPUTS = ("image", "mask", "reference_images")
# The status of a row kept out of the dataset by a stage's safety checker (no image, the reason in
# `error`) or by the spec's `filters:` (the image kept, the reason in `filter_reason`).
FILTERED = "filtered"


def status_counts(table: pa.Table) -> dict[str, int]:
    """How many rows of ``table`` have each status, counted in Arrow (an output may hold 100M rows)."""
    return {c["values"]: c["counts"] for c in pc.value_counts(table.column("status")).to_pylist()}


# The columns the spec's `filters:` add after the fixed ones (pipeline/synth/filters.py).
PHASH, PROB, REASON = "phash", "label_prob", "filter_reason"
# A manifest column under one of these names that shardgen does not read passes through as
# SOURCE_PREFIX + its name, so the output's own value never hides the source's.
RESERVED = frozenset(OUTPUT_SCHEMA.names) | frozenset(CONSUMED_INPUTS) | {PHASH, PROB, REASON}
SOURCE_PREFIX = "source_"
# Lets `datasets.load_dataset("parquet", ...)` decode `image` as PIL images without a cast.
HF_METADATA = {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()}


def to_output_table(table: pa.Table) -> pa.Table:
    """Shape a table that the pipeline produced into the output schema (docs/contract.md)."""
    n = table.num_rows
    data = table.column(columns.IMAGE_BYTES).combine_chunks().cast(pa.binary())
    # A row without an image (error rows, safety-filtered ones) has a null `image`, not a struct of
    # nulls: `datasets` decodes a struct whose bytes and path are both null as an error.
    image = pa.StructArray.from_arrays(
        [data, table.column(columns.IMAGE_PATH).combine_chunks().cast(pa.string())],
        fields=list(IMAGE_TYPE), mask=pc.is_null(data),
    )
    stages = pa.array([s.split(",") if s else [] for s in table.column(columns.STAGES).to_pylist()],
                      pa.list_(pa.string()))
    computed = {"image": image, "stages": stages, "stage_params": table.column(columns.STAGE_PARAMS)}
    arrays, fields = [], []
    for f in OUTPUT_SCHEMA:
        col = computed.get(f.name, table.column(f.name) if f.name in table.column_names else pa.nulls(n))
        arrays.append(col.cast(f.type))
        fields.append(f)
    for name in table.column_names:
        if name in OUTPUT_SCHEMA.names or name in CONSUMED_INPUTS or name.startswith(columns.INTERNAL_PREFIX):
            continue
        arrays.append(table.column(name))
        fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=HF_METADATA))
