"""The embedded default: a sample manifest and spec that run on local Ray, local files and the
built-in models, with no GPU and no network."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.spec import JobSpec, parse_spec

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star"]
BACKGROUNDS = ["blue", "white", "black", "gray"]


def sample_prompts(rows: int) -> list[str]:
    return [
        f"a {COLOURS[i % len(COLOURS)]} {SHAPES[(i // len(COLOURS)) % len(SHAPES)]} "
        f"on a {BACKGROUNDS[(i // 3) % len(BACKGROUNDS)]} background"
        for i in range(rows)
    ]


def write_manifest(path: Path, rows: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "id": [f"demo-{i:05d}" for i in range(rows)],
        "prompt": sample_prompts(rows),
        "split": ["train" if i % 10 else "test" for i in range(rows)],
    })
    pq.write_table(table, path)
    return path


def demo_spec(folder: Path, rows: int) -> JobSpec:
    manifest = write_manifest(folder / "manifest.parquet", rows)
    return parse_spec({
        "manifest": str(manifest),
        "output": str(folder / "dataset"),
        "stages": [{"kind": "text_to_image", "model": "builtin:tiny-sd", "steps": 20, "width": 64, "height": 64,
                    "batch_size": 8, "actors": 1}],
        "format": {"rows_per_shard": 100},
    })
