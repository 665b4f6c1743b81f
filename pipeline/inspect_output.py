"""`shardgen inspect OUTPUT`: what a finished (or unfinished) output holds, read through the
storage layer like everything else."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from pipeline import layout, storage
from pipeline.encode import EXTENSIONS
from pipeline.stats import Stats


def inspect(output: str, rows: int = 5, save: str | None = None) -> str:
    fs, path = storage.arrow_filesystem(output)
    lines = [f"{output}: " + ("finished (_SUCCESS present)" if storage.exists(storage.join(output, layout.SUCCESS))
                              else "NOT finished (no _SUCCESS)")]
    if storage.exists(storage.join(output, layout.STATS)):
        stats = Stats.from_json(storage.read_bytes(storage.join(output, layout.STATS)))
        lines.append(f"rows {stats.rows} ok {stats.ok} error {stats.error} in {stats.shards} shard(s); "
                     f"{stats.elapsed_s} s, {stats.images_per_s} images/s")
    table = pq.read_table(f"{path}/{layout.DATA}", filesystem=fs)
    lines.append(f"columns: {', '.join(table.schema.names)}")
    errors = Counter(e for e in table.column("error").to_pylist() if e)
    for message, count in errors.most_common(5):
        lines.append(f"  error x{count}: {message}")
    for row in table.slice(0, rows).to_pylist():
        lines.append(f"  {row['id']}: {row['status']} {row['width']}x{row['height']} {'>'.join(row['stages'])} "
                     f"{row['prompt']!r}")
    if save:
        folder = Path(save)
        folder.mkdir(parents=True, exist_ok=True)
        for row in table.slice(0, rows).to_pylist():
            if row["image"]["bytes"]:
                name = row["image"]["path"] or f"{row['id']}.{EXTENSIONS['png']}"
                (folder / name).write_bytes(row["image"]["bytes"])
        lines.append(f"saved the first {rows} images under {folder}")
    return "\n".join(lines)
