"""The driver's bookkeeping at scale, in process: the manifest's nulls and duplicates counted out of
core, foreign ids found by an anti-join, repeated shards found without a set of every id, a finished
output answered without its manifest, and the summary of a resumed run."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import id_checks, job, manifest, resume
from pipeline.errors import ManifestError, SpecError
from pipeline.job import summary_line
from pipeline.spec import parse_spec
from pipeline.stats import Stats
from tests.conftest import write_manifest


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
    written = resume.Written([n for n, _ in shards], [len(i) for _, i in shards],
                             pa.table({"id": [i for _, ids in shards for i in ids]}))
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
