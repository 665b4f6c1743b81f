"""The shard writer in process: shards of exactly rows_per_shard rows whatever the bundles' sizes,
partial shards published by time, retried bundles taken once; the encode options it depends on."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import layout
from pipeline.encode import encode_image
from pipeline.plan import encode_bundle_rows
from pipeline.spec import FormatSpec, StorageSpec, parse_spec
from pipeline.writers.shards import ShardWriter, output_rows
from tests.synthetic_output import _task_table


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def bundles(sizes: list[int], size: int = 8, split: list[str] | None = None):
    """Output rows in bundles of ``sizes`` rows, ids numbered on across bundles."""
    rng = np.random.default_rng(0)
    start = 0
    for n in sizes:
        table, _ = _task_table(rng, list(range(start, start + n)), size)
        if split is not None:
            table = table.append_column(layout.SPLIT_COLUMN, pa.array([split[i % len(split)] for i in range(n)]))
        start += n
        yield output_rows(table)


def shard_rows(output, files: list[str]) -> list[int]:
    return [pq.ParquetFile(f"{output}/{name}").metadata.num_rows for name in files]


def test_shards_hold_rows_per_shard_whatever_the_bundles(tmp_path):
    """5,000 rows at rows_per_shard 1000 in Ray's 1,024-row bundles made 1000 + 24 row shards
    (10 of them); now they make the 5 shards validate predicts."""
    writer = ShardWriter(str(tmp_path), StorageSpec(), "run-a", 1000)
    for key, (table, report) in enumerate(bundles([1024, 1024, 1024, 1024, 904])):
        writer.add(table, report, key)
    report = writer.flush()
    assert shard_rows(tmp_path, report.files) == [1000] * 5
    ids = pq.read_table(f"{tmp_path}/data").column("id").to_pylist()
    assert sorted(ids) == [f"row-{i:05d}" for i in range(5000)]
    assert report.rows == 5000 and report.ok == 4500 and len(set(report.files)) == 5


def test_uneven_bundles_leave_one_short_shard_at_the_end(tmp_path):
    writer = ShardWriter(str(tmp_path), StorageSpec(), "run-a", 4)
    for key, (table, report) in enumerate(bundles([3, 3, 3, 3, 1])):
        writer.add(table, report, key)
    assert shard_rows(tmp_path, writer.report.files) == [4, 4, 4]  # published as they fill
    assert shard_rows(tmp_path, writer.flush().files) == [4, 4, 4, 1]


def test_a_retried_bundle_is_taken_once(tmp_path):
    writer = ShardWriter(str(tmp_path), StorageSpec(), "run-a", 4)
    (table, report), = bundles([3])
    writer.add(table, report, key=7)
    writer.add(table, report, key=7)
    assert writer.flush().rows == 3 and shard_rows(tmp_path, writer.report.files) == [3]


def test_rows_waiting_longer_than_publish_every_are_published(tmp_path):
    clock = Clock()
    writer = ShardWriter(str(tmp_path), StorageSpec(), "run-a", 1000, publish_every_s=60, clock=clock)
    first, second, third = bundles([5, 5, 5])
    writer.add(*first, key=0)
    clock.now = 59
    writer.add(*second, key=1)
    assert writer.report.files == []  # the oldest row has waited 59 s
    clock.now = 60
    writer.publish_due()  # no new rows: the publisher's clock thread calls this
    assert shard_rows(tmp_path, writer.report.files) == [10]
    clock.now = 100
    writer.add(*third, key=2)  # a new partial shard's wait starts with its first row
    clock.now = 159
    writer.publish_due()
    assert len(writer.report.files) == 1
    clock.now = 160
    writer.publish_due()
    assert shard_rows(tmp_path, writer.report.files) == [10, 5]


def test_each_split_fills_its_own_shards(tmp_path):
    writer = ShardWriter(str(tmp_path), StorageSpec(), "run-a", 3)
    for key, (table, report) in enumerate(bundles([4, 4, 5], split=["train", "train", "test"])):
        writer.add(table, report, key)
    files = writer.flush().files
    by_split = {}
    for name, rows in zip(files, shard_rows(tmp_path, files)):
        by_split.setdefault(layout.split_of(name), []).append(rows)
    assert by_split == {"train": [3, 3, 3, 1], "test": [3]}


def test_png_compress_level_changes_bytes_not_pixels():
    y, x = np.mgrid[0:64, 0:64]
    image = np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)
    fast, small = (encode_image(image, FormatSpec(png_compress_level=level)) for level in (1, 9))
    assert fast != small
    for data in (fast, small):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), image)


@pytest.mark.parametrize("size, level, batch, rows", [(8, 1, 32, 32), (512, 1, 256, 95), (512, 6, 256, 38),
                                                      (512, 6, 8, 8), (2048, 6, 8, 2)])
def test_encode_bundles_are_sized_by_time(size, level, batch, rows):
    """About two seconds of encoding a write task, and never more than a batch: a bundle of 2048²
    images is a few rows, one of thumbnails a batch."""
    spec = parse_spec({"manifest": "m.parquet", "output": "out", "format": {"png_compress_level": level},
                       "stages": [{"kind": "text_to_image", "width": size, "height": size, "batch_size": batch}],
                       "limits": {"max_width": 4096, "max_height": 4096, "max_pixels": 4096 * 4096}})
    assert encode_bundle_rows(spec) == rows
