"""The driver's bookkeeping at scale, in process: the manifest's nulls and duplicates counted out of
core, foreign ids found by an anti-join, repeated shards found without a set of every id, a finished
output answered without its manifest, the shard index a resume reads instead of the shards, the
summary of a resumed run, verify's checks over groups of shards, and done ids skipped by the
partitioned anti-join (the one Ray job here)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import id_checks, job, layout, manifest, resume, shard_index
from pipeline.errors import ManifestError, SpecError
from pipeline.job import summary_line
from pipeline.spec import StorageSpec, parse_spec
from pipeline.stats import Stats
from pipeline.writers.shards import ShardWriter, output_rows
from tests.helpers import write_manifest
from tests.synthetic_output import _task_table


def stream(ids: list, batch: int = 3) -> pa.RecordBatchReader:
    table = pa.table({"id": pa.array(ids, pa.string())})
    return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=batch))


def test_ids_are_counted_with_nulls_and_duplicates():
    counts = id_checks.count_ids(stream(["c", "a", None, "b", "a", "c", "c", None, "d"]))
    assert (counts.rows, counts.nulls, counts.duplicated, counts.examples) == (9, 2, 2, ["a", "c"])
    assert id_checks.count_ids(stream([])).rows == 0


def test_manifest_in_several_files_is_checked_as_one(tmp_path):
    folder = tmp_path / "m"
    write_manifest(str(folder / "part-0.parquet"), [{"key": f"k{i}", "prompt": "p"} for i in range(50)])
    write_manifest(str(folder / "part-1.parquet"), [{"key": f"k{i}", "prompt": "p"} for i in range(50, 120)])
    spec = parse_spec({"manifest": str(folder), "output": str(tmp_path / "out"), "columns": {"id": "key"}})
    assert manifest.check(spec) == 120
    write_manifest(str(folder / "part-2.parquet"), [{"key": f"k{i}", "prompt": "p"} for i in range(0, 24, 2)])
    with pytest.raises(ManifestError, match=r"12 duplicate id\(s\): 'k0', 'k10', .* \.\.\.$"):
        manifest.check(spec)


def test_foreign_ids_are_found_by_an_anti_join():
    count, examples = id_checks.missing_from(pa.array(["x", "b", "a", "y"]), stream(["a", "b", "c"]))
    assert (count, examples) == (2, ["x", "y"])


def test_only_shards_repeating_kept_ids_are_removed():
    shards = [("s0", ["a", "b"]), ("s1", ["c", "d"]), ("s2", ["b", "e"]), ("s3", ["e", "f"]), ("s4", ["g"])]
    rows = [(n, i) for n, ids in shards for i in ids]
    written = resume.Written([n for n, _ in shards], shard_index.conform(pa.table({
        "shard": [n for n, _ in rows], "id": [i for _, i in rows], "status": ["ok"] * len(rows),
        "error": pa.nulls(len(rows), pa.string())})))
    # s2 repeats s0's "b"; once it is gone, s3's "e" is no repeat.
    assert resume._repeating(written) == {"s2"}
    assert written.without({"s2"}).done().to_pylist() == ["a", "b", "c", "d", "e", "f", "g"]
    assert resume._repeating(written.without({"s2"})) == set()


def test_finished_output_answers_without_its_manifest(synthetic_output, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(synthetic_output.output, out)
    record = json.loads((out / "_job.json").read_text())
    record["spec"].update(output=str(out), manifest=str(tmp_path / "manifest.parquet"))
    (out / "_job.json").write_text(json.dumps(record))
    spec = parse_spec(record["spec"])
    checked = job.check(spec)  # no manifest at that path: it is not read
    assert checked.finished is not None and checked.rows == synthetic_output.rows
    with pytest.raises(SpecError, match="changed: manifest"):
        job.check(parse_spec({**record["spec"], "manifest": str(tmp_path / "other.parquet")}))
    with pytest.raises(ManifestError, match="cannot read manifest"):
        job.check(spec, overwrite=True)  # starting again reads it


def test_written_ids_come_back_as_one_array(synthetic_output):
    spec = parse_spec({"manifest": synthetic_output.manifest, "output": synthetic_output.output})
    written = resume.scan(spec)
    done = written.done()
    assert len(written.files) == 4 and len(done) == written.rows == synthetic_output.rows
    assert sorted(done.to_pylist()) == sorted(pq.read_table(synthetic_output.manifest).column("id").to_pylist())


def test_summary_after_a_resume_says_this_runs_rows_and_rate_and_the_total_apart():
    spec = parse_spec({"manifest": "m.parquet", "output": "out"})
    stats = Stats(run_id="r2", runs=["r1", "r2"], rows=5000, ok=4990, error=10, errors_by_kind={"prompt": 10},
                  shards=5, rows_this_run=1200, elapsed_s=33.7, images_per_s=35.61)
    first = summary_line(spec, Stats(**{**stats.__dict__, "runs": ["r2"], "rows_this_run": 5000}))
    assert first.startswith("shardgen: 5000 rows (4990 ok, 10 error) in 33.7 s, 35.61 images/s -> out")
    assert summary_line(spec, stats).startswith(
        "shardgen: 1200 rows this run in 33.7 s, 35.61 images/s; the output holds 5000 rows (4990 ok, 10 error) "
        "from 2 runs -> out")


def test_a_resume_reads_the_runs_index_not_its_shards_and_the_end_removes_it(tmp_path):
    rows = 10
    write_manifest(str(tmp_path / "m.parquet"), [{"id": f"row-{i:05d}", "prompt": "p"} for i in range(rows + 3)])
    spec = parse_spec({"manifest": str(tmp_path / "m.parquet"), "output": str(tmp_path / "out")})
    writer = ShardWriter(spec.output, StorageSpec(), "20260101T000000-aaaa", 4)
    writer.add(*output_rows(_task_table(np.random.default_rng(0), list(range(rows)), 8)[0]), key=0)
    files = writer.flush().files  # 4 + 4 + 2 rows, and one index file naming them
    index = list((tmp_path / "out" / layout.INDEX).iterdir())
    assert len(index) == 1 and pq.read_table(index[0]).column("shard").to_pylist() == [files[0]] * 4 + \
        [files[1]] * 4 + [files[2]] * 2
    # A shard the index names is not read again: not even a broken one fails the scan.
    (tmp_path / "out" / files[0]).write_bytes(b"not parquet")
    late = resume_shard(tmp_path / "out", "part-20260101T000001-bbbb-000000", ["row-00010", "row-00011"])
    lines: list[str] = []
    written = resume.scan(spec, log=lines.append)
    assert written.files == sorted([*files, late]) and written.rows == 12 and lines == []
    assert sorted(written.done().to_pylist()) == [f"row-{i:05d}" for i in range(12)]
    assert len(list((tmp_path / "out" / layout.INDEX).iterdir())) == 2  # the late shard, read once, is indexed
    assert resume.scan(spec, log=lines.append).rows == 12 and lines == []
    # This run's shard: its rows come from the index this run wrote; then the index goes.
    new = resume_shard(tmp_path / "out", "part-20260101T000002-cccc-000000", ["row-00012"])
    shard_index.write(spec.output, spec.storage, shard_index.rows_of(new, pq.read_table(tmp_path / "out" / new)))
    (tmp_path / "out" / new).write_bytes(b"not parquet either")
    kept, table = resume.settle(spec, written, [new], rows + 3, log=lines.append)
    assert kept == sorted([*files, late, new]) and table.num_rows == 13 and lines == []
    assert not (tmp_path / "out" / layout.INDEX).exists()


def resume_shard(output, name: str, ids: list[str]) -> str:
    """A published shard of ``ids`` (all ok) that no index names; its name relative to the output."""
    path = output / layout.DATA / f"{name}.parquet"
    pq.write_table(pa.table({"id": ids, "status": ["ok"] * len(ids), "error": pa.nulls(len(ids), pa.string())}), path)
    return f"{layout.DATA}/{name}.parquet"


def test_inspect_reads_shards_of_one_schema_without_a_union_and_of_two_with_one(tmp_path):
    from pipeline.inspect.output import Output

    data = tmp_path / "out" / layout.DATA
    data.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"], "status": ["ok"]}), data / "part-0.parquet")
    pq.write_table(pa.table({"id": ["b"], "status": ["error"]}), data / "part-1.parquet")
    out = Output(str(tmp_path / "out"))
    assert out.schemas() == 1 and out.query("SELECT count(*) AS n FROM rows")[0]["n"] == 2
    # A later run's shard with a column more: read by name, its column kept.
    pq.write_table(pa.table({"id": ["c"], "status": ["ok"], "lora": ["x"]}), data / "part-2.parquet")
    out = Output(str(tmp_path / "out"))
    assert out.schemas() == 2
    assert out.query("SELECT id, lora FROM rows ORDER BY id") == [
        {"id": "a", "lora": None}, {"id": "b", "lora": None}, {"id": "c", "lora": "x"}]


def test_verify_reads_the_shards_in_groups_and_finds_what_crosses_them(synthetic_output, tmp_path, monkeypatch):
    """verify with one shard a group: a whole output passes, --deep reads every image and --sample
    draws the rows one query over all shards draws; an id repeated in two shards, the manifest id
    it replaced, and bad statuses in two shards are each found once over the groups."""
    from pipeline import verify
    from pipeline.inspect.output import Output

    monkeypatch.setattr(verify, "GROUP_SHARDS", 1)
    out = tmp_path / "out"
    shutil.copytree(synthetic_output.output, out)
    assert not verify.verify(str(out), manifest=synthetic_output.manifest, log=lambda _: None).failures
    assert verify.verify(str(out), deep=True, log=lambda _: None).images_checked == synthetic_output.ok
    whole = Output(str(out))
    drawn = whole.read_rows(whole.sample(20, 3, view="rows"), ["id"])
    assert sorted(r["id"] for r in verify._sampled_rows(whole, 20, 3)) == sorted(r["id"] for r in drawn)
    first, second, third = sorted((out / layout.DATA).glob("*.parquet"))[:3]
    twin = pq.read_table(first).column("id")[0].as_py()
    replaced = pq.read_table(second).column("id")[0].as_py()
    bad = []
    for shard, row, change in [(second, 0, {"id": twin}), (first, 1, {"status": "error"}),
                               (third, 1, {"status": "error"})]:
        table = pq.read_table(shard)
        for column, value in change.items():
            values = table.column(column).to_pylist()
            values[row] = value
            table = table.set_column(table.column_names.index(column), column,
                                     pa.array(values, table.schema.field(column).type))
        if "status" in change:
            bad.append(f"{table.column('id')[row].as_py()}: status error")
        pq.write_table(table, shard, row_group_size=100)
    failures = verify.verify(str(out), manifest=synthetic_output.manifest, log=lambda _: None).failures
    found = {(f.check, f.message): f.examples for f in failures}
    assert found[("ids", "1 id(s) in more than one row")] == [f"{twin} x2"]
    assert found[("manifest", "1 manifest id(s) not in the output")] == [replaced]
    assert found[("status", "2 row(s) whose status disagrees with image_sha256 (ok exactly where an image is)")] == bad
    assert len(failures) == 4 and failures[3].message.startswith("2 row group(s) whose rows without an image")


def test_done_ids_are_cut_into_ranges_that_name_each_ids_partition():
    from pipeline import done_ids

    done = pa.array([f"row-{i:03d}" for i in (9, 1, 7, 3, 5, 11, 0)])
    parts, bounds = done_ids.ranges(done, 3)
    assert [p.to_pylist() for p in parts] == [["row-000", "row-001", "row-003"], ["row-005", "row-007", "row-009"],
                                              ["row-011"]]
    assert bounds == ["row-005", "row-011"]
    asked = pa.array(["row-000", "row-004", "row-005", "row-010", "row-011", "zzz", ""])
    assert done_ids.partition_of(asked, bounds).tolist() == [0, 0, 1, 1, 2, 2, 0]
    assert [done_ids.how(n) for n in (0, done_ids.PARTITIONED_FROM - 1, done_ids.PARTITIONED_FROM)] == [
        done_ids.PER_BLOCK, done_ids.PER_BLOCK, done_ids.PARTITIONED]
