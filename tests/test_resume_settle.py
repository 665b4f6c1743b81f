"""Resume's rules, deterministically and without Ray: which spec changes refuse a rerun (README:
`manifest`, `columns`, `stages`, `flows`, `format`, `limits`; not `storage`, `max_error_fraction`
or the pools), and `settle`, which decides what a finished run keeps: the listed shards and the
run's own, no stray shard (one that appears mid-run), and every manifest id exactly once."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import job_record, layout, resume
from pipeline.errors import ShardgenError, SpecError
from pipeline.spec import parse_spec

STAGE = {"kind": "text_to_image", "steps": 4}
FLOW_STAGE = {"kind": "inpainting", "steps": 4}


def spec_dict(tmp_path: Path, **fields) -> dict:
    return {"manifest": str(tmp_path / "m.parquet"), "output": str(tmp_path / "out"), **fields}


def first_run(tmp_path: Path, **fields) -> None:
    """An unfinished output whose _job.json a run of this spec wrote when it started."""
    job_record.write_job_file(parse_spec(spec_dict(tmp_path, **fields)), "20260101T000000-aaaaaa",
                              datetime.now(timezone.utc))


@pytest.mark.parametrize("first, rerun, named", [
    ({"stages": [STAGE]}, {"manifest": "other.parquet", "stages": [STAGE]}, "manifest ("),
    ({"stages": [STAGE]}, {"columns": {"prompt": "caption"}, "stages": [STAGE]}, "columns.prompt ("),
    ({"stages": [STAGE]}, {"stages": [{**STAGE, "steps": 5}]}, "stages.0.steps (4 -> 5)"),
    ({"flows": {"a": [FLOW_STAGE]}}, {"flows": {"a": [{**FLOW_STAGE, "steps": 6}]}}, "flows.a.0.steps (4 -> 6)"),
    ({"flows": {"a": [FLOW_STAGE]}}, {"flows": {"a": [FLOW_STAGE], "b": [STAGE]}}, "flows.b (null -> "),
    ({"stages": [STAGE]}, {"stages": [STAGE], "format": {"image": "webp"}}, 'format.image ("png" -> "webp")'),
    ({"stages": [STAGE]}, {"stages": [STAGE], "format": {"rows_per_shard": 7}}, "format.rows_per_shard ("),
    ({"stages": [STAGE]}, {"stages": [STAGE], "limits": {"max_pixels": 4096}}, "limits.max_pixels ("),
], ids=["manifest", "columns", "stages", "flows", "flows-added", "format-image", "format-rows", "limits"])
def test_a_rerun_with_a_changed_row_field_is_refused_naming_it(tmp_path, first, rerun, named):
    first_run(tmp_path, **first)
    rerun = spec_dict(tmp_path, **rerun)
    if rerun["manifest"] == "other.parquet":
        rerun["manifest"] = str(tmp_path / "other.parquet")
    with pytest.raises(SpecError) as refused:
        resume.check_same_job(parse_spec(rerun))
    assert f"holds a run of another spec (changed: {named}" in str(refused.value) or \
        f"; {named}" in str(refused.value), refused.value
    assert "--overwrite" in str(refused.value)


def test_storage_error_fraction_and_pools_may_change(tmp_path):
    first_run(tmp_path, stages=[STAGE])
    resume.check_same_job(parse_spec(spec_dict(
        tmp_path, stages=[{**STAGE, "actors": 2, "cpus_per_actor": 0.5}], max_error_fraction=0.3,
        storage={"max_attempts": 7})))


# --- settle ------------------------------------------------------------------------------------

def shard(output: Path, name: str, ids: list[str]) -> str:
    """A published shard holding ``ids`` (all ok), as data/NAME.parquet; its name relative to the output."""
    path = output / layout.DATA / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "status": ["ok"] * len(ids), "error": pa.nulls(len(ids), pa.string())}),
                   path)
    return f"{layout.DATA}/{name}.parquet"


def test_settle_removes_a_shard_that_appeared_mid_run_and_keeps_the_rest(tmp_path):
    spec = parse_spec(spec_dict(tmp_path, stages=[STAGE]))
    output = tmp_path / "out"
    kept = shard(output, "part-a", ["r0", "r1"])
    written = resume.scan(spec, log=lambda _: None)  # what the rerun found when it started
    new = shard(output, "part-b", ["r2", "r3"])  # this run's own
    stray = shard(output, "part-late", ["r1", "r2"])  # a dead run's late write, after the scan
    lines: list[str] = []
    files, table = resume.settle(spec, written, [new], 4, log=lines.append)
    assert files == [kept, new]
    assert not (output / stray).exists() and (output / kept).exists() and (output / new).exists()
    assert sorted(table.column("id").to_pylist()) == ["r0", "r1", "r2", "r3"]
    assert lines == [f"shardgen: removed 1 file(s) that no run accounts for: {stray}"]


def test_settle_refuses_duplicate_ids_so_no_success_is_written(tmp_path):
    """Two kept shards that share an id (or a row short of the manifest): settle raises before
    anything marks the output finished."""
    spec = parse_spec(spec_dict(tmp_path, stages=[STAGE]))
    output = tmp_path / "out"
    shard(output, "part-a", ["r0", "r1"])
    written = resume.scan(spec, log=lambda _: None)
    new = shard(output, "part-b", ["r1", "r2"])
    with pytest.raises(ShardgenError, match=r"the output holds 4 rows with 3 distinct ids for 4 manifest rows"):
        resume.settle(spec, written, [new], 4, log=lambda _: None)
    with pytest.raises(ShardgenError, match=r"holds 2 rows with 2 distinct ids for 3 manifest rows"):
        resume.settle(spec, written, [], 3, log=lambda _: None)
    assert not (output / layout.SUCCESS).exists()


def test_settle_refuses_when_a_shard_of_this_run_is_gone(tmp_path):
    spec = parse_spec(spec_dict(tmp_path, stages=[STAGE]))
    written = resume.scan(spec, log=lambda _: None)
    with pytest.raises(ShardgenError, match=r"gone from the output: data/part-x.parquet"):
        resume.settle(spec, written, ["data/part-x.parquet"], 0, log=lambda _: None)


def test_scan_removes_temporary_files_and_shards_repeating_earlier_ids(tmp_path):
    spec = parse_spec(spec_dict(tmp_path, stages=[STAGE]))
    output = tmp_path / "out"
    first = shard(output, "part-a", ["r0", "r1"])
    repeat = shard(output, "part-b", ["r1", "r2"])
    temporary = output / layout.DATA / ".part-c.parquet.tmp-1"
    temporary.write_bytes(b"partial")
    written = resume.scan(spec, log=lambda _: None)
    assert written.files == [first] and written.ids == {"r0", "r1"} and written.removed == [repeat]
    assert sorted(p.name for p in (output / layout.DATA).iterdir()) == ["part-a.parquet"]
