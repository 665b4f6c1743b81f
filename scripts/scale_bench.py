"""The driver's bookkeeping at scale: time and peak memory of the steps that grow with a job.

    .venv/bin/python scripts/scale_bench.py --rows 1000000 20000000 --shards 2000 20000

Builds, in a temporary folder, a manifest of N rows (id and prompt) and an output of M shards of
id/status/error rows (no images: the steps measured read only those columns), then runs each step
in a fresh process and prints its wall time and the process's peak RSS:

- ``manifest check``: the checks `validate` and `run` make on the manifest's ids (manifest.check);
- ``resume``: what a rerun on an unfinished output does before it generates: the manifest check,
  reading every shard's id/status/error (resume.scan: from the shard index a run leaves,
  OUTPUT/_index/, and from the shards themselves where no index names them) and the check of
  the done ids against the manifest (resume.check_ids);
- ``verify`` (``--verify-shards``): `shardgen verify --manifest` over an output of M shards of
  ``--rows-per-shard`` rows in the real output schema (written through the project's own shard
  writer and sink; half the rows ok with a few bytes of image each, half errors).

Each step prints wall time and CPU time: on a shared, loaded machine the CPU time is what a quiet
core's wall time would be.

Only functions every shardgen version has are called, so the same script measures before and
after a change (run it with PYTHONPATH set to the other checkout).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

STEP = """
import json, sys, time
from pipeline import manifest, resume
from pipeline.spec import parse_spec
spec = parse_spec({"manifest": sys.argv[2], "output": sys.argv[3]})
def peak_mib():
    # This process's own peak (VmHWM): getrusage's ru_maxrss also counts the parent's resident
    # memory when it started this one (Linux keeps the larger of the two across exec).
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
started, cpu = time.perf_counter(), time.process_time()
if sys.argv[1] == "manifest":
    manifest.check(spec)
elif sys.argv[1] == "verify":
    from pipeline.verify import verify
    failures = verify(sys.argv[3], manifest=sys.argv[2], log=lambda _: None).failures
    assert not failures, failures
else:
    manifest.check(spec)
    written = resume.scan(spec)
    resume.check_ids(written, spec)
    written.done()
print(json.dumps({"s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu,
                  "peak_mib": peak_mib()}))
"""


def make_manifest(path: str, rows: int) -> None:
    writer = None
    for start in range(0, rows, 1_000_000):
        n = min(1_000_000, rows - start)
        table = pa.table({"id": pa.array([f"row-{i:09d}" for i in range(start, start + n)]),
                          "prompt": pa.array(["a red circle on a white background"] * n)})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def make_output(folder: str, shards: int, rows_per_shard: int, index: bool) -> None:
    """M shards; with ``index``, the shard index their run wrote (pipeline/shard_index.py's
    columns), as a run that was interrupted leaves it."""
    data = Path(folder, "data")
    data.mkdir(parents=True)
    indexed = []
    for s in range(shards):
        ids = [f"row-{i:09d}" for i in range(s * rows_per_shard, (s + 1) * rows_per_shard)]
        table = pa.table({"id": ids, "status": ["ok"] * len(ids), "error": pa.nulls(len(ids), pa.string())})
        name = f"part-20260101T000000-000000-{s:06d}.parquet"
        pq.write_table(table, data / name)
        indexed.append(table.add_column(0, "shard", pa.array([f"data/{name}"] * len(ids)).dictionary_encode()))
    if index:
        Path(folder, "_index").mkdir()
        pq.write_table(pa.concat_tables(indexed), Path(folder, "_index", "bench.parquet"))


def make_real_output(folder: str, manifest: str, shards: int, rows_per_shard: int) -> None:
    """A finished output of ``shards`` shards in the output schema, and its manifest."""
    import hashlib
    from datetime import datetime

    from pipeline import columns, shard_index, sink
    from pipeline.spec import StorageSpec, parse_spec
    from pipeline.writers.shards import ShardWriter, output_rows

    rows = shards * rows_per_shard
    make_manifest(manifest, rows)
    spec = parse_spec({"manifest": manifest, "output": folder, "format": {"rows_per_shard": rows_per_shard}})
    ok = [i % 2 == 0 for i in range(rows)]
    images = [f"image {i}".encode() if good else None for i, good in enumerate(ok)]
    table = pa.table({
        "id": [f"row-{i:09d}" for i in range(rows)],
        "status": ["ok" if good else "error" for good in ok],
        "error": [None if good else "prompt: empty" for good in ok],
        "prompt": ["a red circle on a white background"] * rows,
        columns.STAGES: ["text_to_image" if good else None for good in ok],
        columns.STAGE_PARAMS: ["[]"] * rows,
        columns.IMAGE_BYTES: pa.array(images, pa.binary()),
        columns.IMAGE_PATH: [None if d is None else f"{i}.png" for i, d in enumerate(images)],
        "image_sha256": [None if d is None else hashlib.sha256(d).hexdigest() for d in images],
    })
    writer = ShardWriter(folder, StorageSpec(), sink.new_run_id(), rows_per_shard)
    writer.add(*output_rows(table), key=0)
    writer.flush()
    shard_index.remove(folder, StorageSpec())
    now = datetime.now()
    sink.finalize(spec, writer.run_id, [writer.report], writer.report.files, table.select(["id", "status", "error"]),
                  now, now)


def step(name: str, manifest: str, output: str) -> dict:
    # From the temporary folder: the checkout named by PYTHONPATH is the one measured, not the one here.
    done = subprocess.run([sys.executable, "-c", STEP, name, manifest, output], capture_output=True, text=True,
                          cwd=Path(manifest).parent)
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[1_000_000, 20_000_000])
    parser.add_argument("--shards", type=int, nargs="*", default=[2000, 20000])
    parser.add_argument("--rows-per-shard", type=int, default=100)
    parser.add_argument("--verify-shards", type=int, nargs="*", default=[],
                        help="also time `verify --manifest` on outputs of these many shards (real schema)")
    parser.add_argument("--no-index", action="store_true",
                        help="an output without its shard index (a run killed before it wrote any)")
    args = parser.parse_args()
    print("| step | size | wall (CPU) | driver peak RSS |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="shardgen-scale-") as tmp:
        for rows in args.rows:
            manifest = f"{tmp}/m-{rows}.parquet"
            make_manifest(manifest, rows)
            got = step("manifest", manifest, f"{tmp}/none")
            print(f"| manifest check | {rows:,} rows | {got['s']:.1f} s ({got['cpu_s']:.1f} s) | "
                  f"{got['peak_mib']:.0f} MiB |", flush=True)
            Path(manifest).unlink()
        for shards in args.shards:
            output = f"{tmp}/out-{shards}"
            make_output(output, shards, args.rows_per_shard, not args.no_index)
            manifest = f"{tmp}/m-{shards}.parquet"
            make_manifest(manifest, shards * args.rows_per_shard)
            got = step("resume", manifest, output)
            what = "no index" if args.no_index else "indexed"
            print(f"| resume before generating ({what}) | {shards:,} shards x {args.rows_per_shard} rows | "
                  f"{got['s']:.1f} s ({got['cpu_s']:.1f} s) | {got['peak_mib']:.0f} MiB |", flush=True)
        for shards in args.verify_shards:
            output, manifest = f"{tmp}/verify-{shards}", f"{tmp}/m-verify-{shards}.parquet"
            make_real_output(output, manifest, shards, args.rows_per_shard)
            got = step("verify", manifest, output)
            print(f"| verify --manifest | {shards:,} shards x {args.rows_per_shard} rows | "
                  f"{got['s']:.1f} s ({got['cpu_s']:.1f} s) | {got['peak_mib']:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
