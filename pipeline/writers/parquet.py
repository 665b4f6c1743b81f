"""Parquet shards: the pipeline's own output format."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.row_groups import row_group_size
from pipeline.writers.base import FormatWriter


class ParquetWriter(FormatWriter):
    suffix = ".parquet"

    def encode(self, table: pa.Table) -> bytes:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, row_group_size=row_group_size(table))
        return buf.getvalue().to_pybytes()
