"""Full calls: the fill of each stage's pipeline calls in a job with two flows and mixed negative
prompts, read from the job's `_stats.json`.

    RAY_ADDRESS=local .venv/bin/python scripts/fill_bench.py --rows 400

The job: ``--rows`` rows of the random-weight built-in at 32x32, 2 steps, `batch_size: 8`,
`batch_invariant: false` (as on GPUs); flow `a` is text_to_image, flow `b` text_to_image then
image_to_image; rows alternate between the flows and every other pair has a negative prompt.
Prints, as one JSON line, per stage kind: rows in calls, calls and fill (rows per call over the
batch size: 1.0 when every call was full), and the wall time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    from pipeline.job import run_job
    from pipeline.spec import parse_spec

    with tempfile.TemporaryDirectory(prefix="shardgen-fill-") as tmp:
        manifest, output = f"{tmp}/manifest.parquet", f"{tmp}/out"
        pq.write_table(pa.table({
            "id": [f"row-{i:06d}" for i in range(args.rows)],
            "task": ["ab"[i % 2] for i in range(args.rows)],
            "prompt": [f"a red circle {i}" for i in range(args.rows)],
            "negative_prompt": ["blurry" if (i // 2) % 2 else "" for i in range(args.rows)],
        }), manifest)
        stage = {"model": "builtin:tiny-sd", "steps": 2, "width": 32, "height": 32, "batch_size": args.batch,
                 "batch_invariant": False}
        spec = parse_spec({"manifest": manifest, "output": output, "flows": {
            "a": [{"kind": "text_to_image", **stage}],
            "b": [{"kind": "text_to_image", **stage}, {"kind": "image_to_image", **stage}],
        }})
        started = time.time()
        run_job(spec, log=lambda *_: None)
        wall = time.time() - started
        stats = json.loads(Path(output, "_stats.json").read_text())
        print(json.dumps({
            "rows": args.rows, "batch_size": args.batch, "wall_s": round(wall, 1),
            "stages": {s["kind"]: {"call_rows": s["call_rows"], "calls": s["calls"], "fill": s["fill"]}
                       for s in stats["stages"]},
        }))


if __name__ == "__main__":
    main()
