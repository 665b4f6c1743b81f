"""The run's shard publisher: one actor holding the run's ShardWriter (pipeline/writers/shards.py),
so that shards hold exactly ``rows_per_shard`` rows whatever sizes the write tasks' bundles have.

Write tasks hand it their encoded rows and wait for the answer (a slow storage slows them down,
not the other way round); a thread publishes partial shards on time even while no rows arrive.
The driver flushes it at the end of the run, or on an interrupt, so that the rows it holds are
published rather than lost.
"""

from __future__ import annotations

import threading

import pyarrow as pa
import ray

from pipeline.writers.shards import ShardReport, ShardWriter

# How often the thread looks for partial shards due: a small share of any sensible publish_every.
TICK_S = 1.0


@ray.remote(num_cpus=0)
class ShardPublisher:
    def __init__(self, writer: ShardWriter):
        self.writer = writer
        self.lock = threading.Lock()
        self.failed: BaseException | None = None  # the thread's storage error, raised on the next call
        self.stop = threading.Event()
        threading.Thread(target=self._tick, name="shardgen-publish", daemon=True).start()

    def _tick(self) -> None:
        while not self.stop.wait(TICK_S):
            with self.lock:
                try:
                    self.writer.publish_due()
                except BaseException as err:  # noqa: BLE001 - kept for the next call to raise
                    self.failed = err
                    return

    def _check(self) -> None:
        if self.failed is not None:
            raise self.failed

    def add(self, table: pa.Table, report: ShardReport, key) -> None:
        with self.lock:
            self._check()
            self.writer.add(table, report, key)

    def finish(self) -> ShardReport:
        """Publish every row still waiting and stop; what this run wrote."""
        self.stop.set()
        with self.lock:
            self._check()
            return self.writer.flush()
