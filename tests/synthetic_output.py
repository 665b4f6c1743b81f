"""An output dataset written through the project's own sink (ShardWriter, finalize) without running
diffusion: random-pixel PNGs (incompressible, so the shards' bytes are the images' bytes), error
rows of several kinds, and prompts that are markup. For the inspect, report and verify tests."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa

from pipeline import columns, shard_index, sink
from pipeline.spec import StorageSpec, parse_spec
from pipeline.writers.shards import ShardWriter, output_rows
from tests.helpers import write_manifest

SCRIPT_PROMPT = "<script>document.title='pwned'</script><img src=x onerror=alert(1)> a castle"
ERRORS = ["prompt: empty", "size: 64x128 is 8192 pixels, over limits.max_pixels 4096",
          "text_to_image: RuntimeError: boom <b>bold</b>"]
START = datetime(2026, 1, 2, 3, 4, 5)


@dataclass
class Synthetic:
    output: str
    manifest: str
    rows: int
    ok: int
    image_bytes: int  # the PNG bytes of every image
    error_ids: list[str]
    script_ids: list[str]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def random_png(rng: np.random.Generator, size: int) -> bytes:
    """A valid RGB PNG of random pixels, stored without compression (Pillow's encoder is several
    times slower, and random pixels do not compress anyway)."""
    rows = np.zeros((size, size * 3 + 1), np.uint8)  # each scanline: filter type 0, then its pixels
    rows[:, 1:] = np.frombuffer(rng.bytes(size * size * 3), np.uint8).reshape(size, size * 3)
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 0))
            + _chunk(b"IEND", b""))


def _task_table(rng: np.random.Generator, ids: list[int], size: int) -> tuple[pa.Table, int]:
    data, statuses, errors, prompts = [], [], [], []
    for i in ids:
        bad = i % 10 == 3
        data.append(None if bad else random_png(rng, size))
        statuses.append("error" if bad else "ok")
        errors.append(ERRORS[(i // 10) % len(ERRORS)] if bad else None)
        prompts.append(SCRIPT_PROMPT if i % 25 == 7 else f"a {['red', 'green', 'blue'][i % 3]} square, number {i} "
                       + "with a long tail of words " * (i % 4))
    n = len(ids)
    table = pa.table({
        "id": [f"row-{i:05d}" for i in ids],
        "status": statuses,
        "error": errors,
        "prompt": prompts,
        "seed": [1000 + i for i in ids],
        "width": [size] * n,
        "height": [size] * n,
        "steps": [4] * n,
        "guidance_scale": [7.5] * n,
        "model": ["builtin:tiny-sd"] * n,
        "scheduler": ["ddpm" if i % 2 else "euler" for i in ids],
        columns.STAGES: [None if s == "error" else "text_to_image" for s in statuses],
        columns.STAGE_PARAMS: ["[]" if s == "error" else json.dumps([{"kind": "text_to_image", "steps": 4}])
                               for s in statuses],
        columns.IMAGE_BYTES: pa.array(data, pa.binary()),
        columns.IMAGE_PATH: [None if d is None else f"row-{i:05d}.png" for d, i in zip(data, ids)],
        "image_sha256": [None if d is None else hashlib.sha256(d).hexdigest() for d in data],
        "elapsed_s": [0.0 if s == "error" else float(rng.gamma(4.0, 0.05)) for s in statuses],
        columns.ELAPSED_PREFIX + "text_to_image": [0.0 if s == "error" else 0.2 for s in statuses],
        "created_at": pa.array([START + timedelta(seconds=i * 0.5) for i in ids], pa.timestamp("us")),
        "task": ["shapes"] * n,
    })
    return table, sum(len(d) for d in data if d is not None)


def build(output: str, manifest: str, rows: int, size: int, rows_per_shard: int, rows_per_task: int,
          seed: int = 0) -> Synthetic:
    """Write ``rows`` rows into ``output`` as a job with that many write tasks would, and its manifest."""
    rng = np.random.default_rng(seed)
    write_manifest(manifest, [{"id": f"row-{i:05d}", "prompt": "p"} for i in range(rows)])
    spec = parse_spec({"manifest": manifest, "output": output, "format": {"rows_per_shard": rows_per_shard},
                       "stages": [{"kind": "text_to_image", "steps": 4, "width": size, "height": size}]})
    run_id = sink.new_run_id()
    writer = ShardWriter(output, StorageSpec(), run_id, rows_per_shard)
    written, image_bytes = [], 0
    for task, start in enumerate(range(0, rows, rows_per_task)):
        table, nbytes = _task_table(rng, list(range(start, min(rows, start + rows_per_task))), size)
        image_bytes += nbytes
        # Each task's rows end in a partial shard, as the time-published shards of a slow run do.
        writer.add(*output_rows(table), key=task)
        writer.flush()
        written.append(table.select(["id", "status", "error"]))
    report = writer.report
    shard_index.remove(output, StorageSpec())  # as the end of a run does (resume.settle)
    sink.finalize(spec, run_id, [report], report.files, pa.concat_tables(written), START, START + timedelta(minutes=5))
    ids = [f"row-{i:05d}" for i in range(rows)]
    return Synthetic(output, manifest, rows, report.ok, image_bytes,
                     error_ids=[x for i, x in enumerate(ids) if i % 10 == 3],
                     script_ids=[x for i, x in enumerate(ids) if i % 25 == 7])
