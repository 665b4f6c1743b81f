"""How many rows go into one Parquet row group of a shard.

Readers fetch whole row groups: a reader that wants a few rows (a viewer's first page, the
thumbnails of `shardgen inspect --html`) reads their whole group, and the Hugging Face dataset
viewer refuses row groups over about 300 MB. `datasets` writes image data 100 rows to a group; so
does shardgen, and fewer where images are large (2048x2048 PNGs run to several MB each), so that
a group stays under a byte budget.
"""

from __future__ import annotations

import pyarrow as pa

MAX_ROWS = 100
MAX_BYTES = 128 * 2**20


def row_group_size(table: pa.Table) -> int:
    """Rows per row group for shards cut from ``table``: at most MAX_ROWS, and at most MAX_BYTES
    of the table's mean row."""
    per_row = table.nbytes / max(table.num_rows, 1)
    return max(1, min(MAX_ROWS, int(MAX_BYTES // max(per_row, 1))))
