"""Write the output dataset: Parquet shards, then _stats.json, _job.json, a dataset card and
_SUCCESS (written last: its absence means the run did not finish).

This module knows pyarrow and the storage layer, not Ray: the plan builder hands it tables.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import columns, layout, storage
from pipeline.row_groups import row_group_size
from pipeline.spec import JobSpec, StorageSpec
from pipeline.stats import StageStats, Stats

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

# The fixed output columns, in order (docs/contract.md); pass-through columns follow them.
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
CONSUMED_INPUTS = ("image", "mask")
# Lets `datasets.load_dataset("parquet", ...)` decode `image` as PIL images without a cast.
HF_METADATA = {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()}


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def to_output_table(table: pa.Table) -> pa.Table:
    """Shape a table that the pipeline produced into the output schema (docs/contract.md)."""
    n = table.num_rows
    image = pa.StructArray.from_arrays(
        [table.column(columns.IMAGE_BYTES).combine_chunks().cast(pa.binary()),
         table.column(columns.IMAGE_PATH).combine_chunks().cast(pa.string())],
        fields=list(IMAGE_TYPE),
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


@dataclass
class ShardReport:
    """What one write task wrote; the reports of all tasks add up to the run's stats."""

    rows: int = 0
    ok: int = 0
    files: list[str] = field(default_factory=list)
    stage_busy_s: dict[str, float] = field(default_factory=dict)


def _error_kind(message: str) -> str:
    return message.split(":", 1)[0] if message else "unknown"


class ShardWriter:
    """Writes tables under OUTPUT/data/ as shards of at most ``rows_per_shard`` rows, each under a
    name that no other task or run uses, each published whole."""

    def __init__(self, output: str, storage_spec: StorageSpec, run_id: str, rows_per_shard: int):
        self.output = output
        self.storage = storage_spec
        self.run_id = run_id
        self.rows_per_shard = rows_per_shard

    def write(self, table: pa.Table, task_index: int) -> ShardReport:
        report = ShardReport(rows=table.num_rows)
        for name in table.column_names:
            if name.startswith(columns.ELAPSED_PREFIX):
                report.stage_busy_s[name[len(columns.ELAPSED_PREFIX):]] = float(pc.sum(table.column(name)).as_py() or 0)
        out = to_output_table(table)
        report.ok = int(pc.sum(pc.equal(out.column("status"), "ok")).as_py() or 0)
        for chunk, start in enumerate(range(0, out.num_rows, self.rows_per_shard)):
            name = layout.shard_name(self.run_id, task_index, chunk)
            buf = pa.BufferOutputStream()
            pq.write_table(out.slice(start, self.rows_per_shard), buf, row_group_size=row_group_size(out))
            storage.write_bytes(storage.join(self.output, name), buf.getvalue().to_pybytes(), self.storage)
            report.files.append(name)
        return report


def combine(reports: list[ShardReport]) -> ShardReport:
    total = ShardReport()
    for r in reports:
        total.rows += r.rows
        total.ok += r.ok
        total.files += r.files
        for k, v in r.stage_busy_s.items():
            total.stage_busy_s[k] = total.stage_busy_s.get(k, 0.0) + v
    return total


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("shardgen", "ray", "torch", "diffusers", "transformers", "pyarrow", "fsspec", "s3fs"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def dataset_card(spec: JobSpec, stats: Stats) -> str:
    features = "\n".join(
        f"    - name: {f.name}\n      dtype: {'image' if f.name == 'image' else _card_dtype(f.type)}"
        for f in OUTPUT_SCHEMA
    )
    stages = "; ".join(f"{name}: " + " -> ".join(f"{s.kind} ({s.model})" for s in flow)
                       for name, flow in spec.flow_map().items())
    return f"""---
configs:
  - config_name: default
    data_files: {layout.DATA}/*.parquet
dataset_info:
  features:
{features}
---
# Generated images

Generated by shardgen, run `{stats.run_id}`: {stats.ok} images ({stats.error} error rows) with
{stages}. Rows with `status: error` keep their id and say why in `error`.

```python
import datasets
ds = datasets.load_dataset("parquet", data_files="{layout.DATA}/*.parquet")  # `image` decodes to PIL images
```
"""


def _card_dtype(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return "list"
    if pa.types.is_timestamp(t):
        return "timestamp[us]"
    return {"string": "string", "int64": "int64", "double": "float64"}[str(t)]


def write_job_file(spec: JobSpec, run_id: str, started: datetime, ended: datetime | None = None,
                   runs: list[str] | None = None) -> None:
    """_job.json: the spec as run (no credentials). Written when a run starts, so that a resumed run
    can check it is the same job, and again at the end."""
    job = {
        "run_id": run_id,
        "runs": runs or [run_id],
        "spec": spec.public_dict(),
        "versions": _versions(),
        "started_at": started.isoformat(),
        "ended_at": ended.isoformat() if ended else None,
    }
    _put(spec, layout.JOB, json.dumps(job, indent=2) + "\n")


def _put(spec: JobSpec, name: str, text: str) -> None:
    storage.write_bytes(storage.join(spec.output, name), text.encode(), spec.storage)


def finalize(spec: JobSpec, run_id: str, reports: list[ShardReport], files: list[str], written: pa.Table,
             started: datetime, ended: datetime) -> Stats:
    """Write _stats.json, _job.json and README.md, then _SUCCESS; return the stats.

    ``files`` and ``written`` (their id, status and error columns) are every shard of the output,
    resumed runs' included; ``reports`` are this run's writes, for its speed and stage times."""
    this_run = combine(reports)
    wall = (ended - started).total_seconds()
    ok = int(pc.sum(pc.equal(written.column("status"), "ok")).as_py() or 0)
    errors = dict(Counter(_error_kind(m) for m in written.column("error").to_pylist() if m is not None))
    runs = sorted({layout.run_of(name) for name in files} | {run_id})
    stats = Stats(
        run_id=run_id,
        runs=runs,
        rows=written.num_rows,
        ok=ok,
        error=written.num_rows - ok,
        errors_by_kind=errors,
        shards=len(files),
        rows_this_run=this_run.rows,
        elapsed_s=round(wall, 3),
        images_per_s=round(this_run.ok / wall, 3) if wall > 0 else None,
        stages=[StageStats(kind, round(this_run.stage_busy_s.get(kind, 0.0), 3))
                for kind in dict.fromkeys(s.kind for s in spec.all_stages())],
    )
    _put(spec, layout.STATS, stats.to_json())
    write_job_file(spec, run_id, started, ended, runs)
    _put(spec, layout.CARD, dataset_card(spec, stats))
    _put(spec, layout.SUCCESS, json.dumps({"run_id": run_id, "rows": written.num_rows}) + "\n")
    return stats
