"""What a read block pays to skip done ids, each way of pipeline/done_ids.py, by number of done ids:

    taskset -c 1 .venv/bin/python scripts/done_ids_bench.py --done 10000 100000 1000000 5000000 --rows 1024

- ``per block``: drop_done, pc.is_in of a block's ids against every done id (a hash of them all
  built for the block);
- ``partitioned``: drop_done_partitioned against DonePartition actors on a local Ray (one call
  per partition the block's ids fall in), and the actors' one-time build.

Half of each block's ids are done. Prints the median time per block of a few blocks.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import pyarrow as pa
import ray

from pipeline import done_ids
from pipeline.cluster import connect


def per_block_s(call, blocks: list[pa.Table]) -> float:
    times = []
    for block in blocks:
        started = time.perf_counter()
        call(block)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--done", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 5_000_000])
    parser.add_argument("--rows", type=int, default=1024, help="rows per read block")
    parser.add_argument("--blocks", type=int, default=7)
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
    ray.shutdown()


if __name__ == "__main__":
    main()
