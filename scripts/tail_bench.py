"""The encode tail: how long after its stage's last image a job's last shard is published.

    RAY_ADDRESS=local .venv/bin/python scripts/tail_bench.py --rows 2000 --size 128

Runs one text_to_image job with the random-weight built-in (1 step: the stage is cheap, what is
timed is encoding and writing) and prints, as one JSON line: the stage's end (the newest
``created_at``, stamped when a stage makes an image), the last shard's publication (the newest
shard file's modification time), the tail between them, the wall time, and the shards' row counts.
Only the spec fields every shardgen version has are set, so the same script measures before and
after a change (run it with PYTHONPATH set to the other checkout).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    args = parser.parse_args()

    from pipeline.job import run_job
    from pipeline.spec import parse_spec

    with tempfile.TemporaryDirectory(prefix="shardgen-tail-") as tmp:
        manifest, output = f"{tmp}/manifest.parquet", f"{tmp}/out"
        pq.write_table(pa.table({"id": [f"row-{i:06d}" for i in range(args.rows)],
                                 "prompt": ["a red circle on a white background"] * args.rows}), manifest)
        spec = parse_spec({
            "manifest": manifest, "output": output, "format": {"rows_per_shard": args.rows_per_shard},
            "stages": [{"kind": "text_to_image", "model": "builtin:tiny-sd", "steps": 1, "width": args.size,
                        "height": args.size, "batch_size": args.batch}],
        })
        started = time.time()
        stats = run_job(spec, log=lambda *_: None)
        wall = time.time() - started
        shards = sorted(Path(output, "data").rglob("*.parquet"))
        # created_at is naive UTC; file times are epoch seconds.
        stage_end = max(t.replace(tzinfo=timezone.utc).timestamp() for t in
                        pq.read_table(f"{output}/data", columns=["created_at"]).column("created_at").to_pylist())
        last_shard = max(p.stat().st_mtime for p in shards)
        print(json.dumps({
            "rows": stats.rows, "size": args.size, "wall_s": round(wall, 1),
            "tail_s": round(last_shard - stage_end, 2),
            "shards": len(shards), "rows_per_shard": [pq.ParquetFile(p).metadata.num_rows for p in shards],
            "image_bytes": sum(p.stat().st_size for p in shards),
        }))


if __name__ == "__main__":
    main()
