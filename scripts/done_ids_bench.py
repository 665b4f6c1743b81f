"""What a read block pays to skip done ids, each way of pipeline/done_ids.py, by number of done ids:

    taskset -c 1 .venv/bin/python scripts/done_ids_bench.py --done 10000 100000 1000000 5000000 --rows 1024

- ``per block``: drop_done, pc.is_in of a block's ids against every done id (a hash of them all
  built for the block);
- ``partitioned``: drop_done_partitioned against DonePartition actors on a local Ray (one call
  per partition the block's ids fall in), and the actors' one-time build.

Half of each block's ids are done. Prints the median time per block of a few blocks.

``--job N``: also a Ray Data read of an N-row manifest in ``--job-blocks`` blocks, half its ids
done, through each way (as the job's first steps, at the light steps' CPU share): wall time to
the last row, and the rows kept.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import pyarrow as pa
import ray
import ray.data

from pipeline import done_ids
from pipeline.cluster import connect


def per_block_s(call, blocks: list[pa.Table]) -> float:
    times = []
    for block in blocks:
        started = time.perf_counter()
        call(block)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def job_s(manifest: str, blocks: int, done: pa.Array) -> tuple[float, int]:
    """Wall time of reading ``manifest`` in ``blocks`` blocks without the ids in ``done`` (the job's
    own DoneIds, so its rule and its line), and the rows kept."""
    started = time.perf_counter()
    skip = done_ids.DoneIds(done)
    try:
        ds = ray.data.read_parquet(manifest, override_num_blocks=blocks, num_cpus=0.25)
        kept = ds.map_batches(skip.filter, fn_kwargs=skip.kwargs, batch_format="pyarrow", num_cpus=0.25).count()
    finally:
        skip.close()
    return time.perf_counter() - started, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--done", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 5_000_000])
    parser.add_argument("--rows", type=int, default=1024, help="rows per read block")
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--job", type=int, help="also time a read of a manifest of this many rows, half done")
    parser.add_argument("--job-blocks", type=int, default=200)
    args = parser.parse_args()
    connect("local")  # the project's local start, tried again when a busy machine makes it miss Ray's time-out
    print("| done ids | per block: is_in | partitioned: per block | partitioned: actors' build |\n|---|---|---|---|")
    for count in args.done:
        done = pa.array([f"row-{i:09d}" for i in range(0, 2 * count, 2)])
        blocks = [pa.table({"id": [f"row-{i:09d}" for i in range(b * args.rows, (b + 1) * args.rows)]})
                  for b in range(args.blocks)]
        is_in = per_block_s(partial(done_ids.drop_done, done=done), blocks)
        started = time.perf_counter()
        parts, bounds = done_ids.ranges(done, done_ids.IDS_PER_PARTITION)
        actors = [done_ids.DonePartition.remote(p) for p in parts]
        ray.get([a.known.remote(pa.array([], pa.string())) for a in actors])
        build = time.perf_counter() - started
        probe = per_block_s(partial(done_ids.drop_done_partitioned, bounds=bounds, partitions=actors), blocks)
        for actor in actors:
            ray.kill(actor)
        print(f"| {count:,} | {is_in * 1e3:.2f} ms | {probe * 1e3:.2f} ms ({len(actors)} actor(s)) | {build:.1f} s |",
              flush=True)
    if args.job:
        import tempfile

        import pyarrow.parquet as pq

        with tempfile.TemporaryDirectory() as tmp:
            ids = pa.array([f"row-{i:09d}" for i in range(args.job)])
            pq.write_table(pa.table({"id": ids, "prompt": ["a red circle"] * args.job}), f"{tmp}/m.parquet",
                           row_group_size=-(-args.job // args.job_blocks))  # a block a row group
            done = ids.filter(pa.array([i % 2 == 0 for i in range(args.job)]))
            print(f"\n| {args.job:,}-row read, {len(done):,} done, {args.job_blocks} blocks | wall | rows kept |\n"
                  "|---|---|---|")
            ray.data.read_parquet(f"{tmp}/m.parquet").count()  # Ray Data's first start, not timed
            for cut, way in [(len(done) + 1, done_ids.PER_BLOCK), (1, done_ids.PARTITIONED)]:
                done_ids.PARTITIONED_FROM = cut  # the rule forced one way, then the other
                seconds, kept = job_s(f"{tmp}/m.parquet", args.job_blocks, done)
                print(f"| {way} | {seconds:.1f} s | {kept:,} |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
