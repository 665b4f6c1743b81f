"""Parquet shards: the pipeline's own output format."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.writers.base import FormatWriter


class ParquetWriter(FormatWriter):
    suffix = ".parquet"

    def encode(self, table: pa.Table) -> bytes:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        return buf.getvalue().to_pybytes()
