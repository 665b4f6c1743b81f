"""The rules of a rerun (README "Resume" and "Exit codes"), through `shardgen run`:

- a resumed run may change `storage` and `max_error_fraction`;
- error rows are rows written: a rerun does not retry them, even when their input has appeared;
- a rerun of a finished output does nothing and recomputes the exit code with the spec given;
- `--overwrite` leaves only the new manifest's ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from pipeline.errors import EXIT_OK, EXIT_ROWS_FAILED
from pipeline.stats import Stats
from tests.helpers import assert_finished_exactly_once, cli, png, read_output, write_manifest


def write_spec(folder: Path, manifest: str, **fields) -> Path:
    spec = {"manifest": manifest, "output": str(folder / "out"), "format": {"rows_per_shard": 2}, **fields}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run(spec: Path, *flags: str) -> tuple[int, str]:
    code, out, _ = cli("run", "--spec", str(spec), *flags)
    return code, out


def rows_by_id(output: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_output(str(output)).to_pylist()}


def stats_of(output: Path) -> Stats:
    return Stats.from_json((output / "_stats.json").read_text())


def test_resume_may_change_storage_and_fraction_and_keeps_error_rows(tmp_path, ray_local):
    (tmp_path / "in").mkdir()
    for i in range(5):
        (tmp_path / "in" / f"{i}.png").write_bytes(png(16, i))
    # "late"'s image does not exist yet: an error row in the first run.
    rows = [{"id": f"row-{i}", "image": f"in/{i}.png"} for i in range(5)] + [{"id": "late", "image": "in/late.png"}]
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    stage = {"kind": "super_resolution", "model": "builtin:tiny-upscaler", "steps": 2, "batch_size": 2,
             "cpus_per_actor": 0.5}
    output = tmp_path / "out"
    code, _ = run(write_spec(tmp_path, manifest, stages=[stage]))
    assert code == EXIT_ROWS_FAILED
    before = rows_by_id(output)
    assert before["late"]["error"] == "image: no file at in/late.png"

    # A crash's leavings: no _SUCCESS and one lost shard of good rows. Meanwhile the missing input
    # has appeared; a retry of the error row would now succeed.
    (output / "_SUCCESS").unlink()
    shards = sorted((output / "data").glob("*.parquet"))
    lost_shard = next(s for s in shards if "late" not in pq.read_table(s, columns=["id"]).column("id").to_pylist())
    lost = set(pq.read_table(lost_shard, columns=["id"]).column("id").to_pylist())
    lost_shard.unlink()
    (tmp_path / "in" / "late.png").write_bytes(png(16, 99))

    spec = write_spec(tmp_path, manifest, stages=[stage], max_error_fraction=0.2,
                      storage={"max_attempts": 4, "retry_mode": "adaptive"})
    code, out = run(spec)

    assert code == EXIT_OK, out  # 1 error row of 6 is within 0.2
    assert f"resuming {output}: {6 - len(lost)} of 6 ids" in out
    assert "within max_error_fraction 0.2" in out
    after = rows_by_id(output)
    assert sorted(after) == sorted(r["id"] for r in rows)
    assert after["late"]["status"] == "error" and after["late"]["error"] == before["late"]["error"]
    assert {i: after[i]["image_sha256"] for i in before} == {i: before[i]["image_sha256"] for i in before}
    stats = stats_of(output)
    assert (stats.rows, stats.ok, stats.error, stats.rows_this_run) == (6, 5, 1, len(lost))
    assert_finished_exactly_once(str(output), manifest)
    job = json.loads((output / "_job.json").read_text())
    assert job["spec"]["storage"]["max_attempts"] == 4 and job["spec"]["max_error_fraction"] == 0.2


def test_finished_output_recomputes_the_exit_code_then_overwrite_starts_again(tmp_path, ray_local):
    stage = {"kind": "text_to_image", "model": "builtin:tiny-sd", "steps": 2, "width": 32, "height": 32,
             "cpus_per_actor": 0.5}
    rows = [{"id": "a", "prompt": "a red circle"}, {"id": "b", "prompt": "a blue square"},
            {"id": "empty", "prompt": ""}]
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    output = tmp_path / "out"
    code, _ = run(write_spec(tmp_path, manifest, stages=[stage]))
    assert code == EXIT_ROWS_FAILED
    first = (output / "_stats.json").read_text()
    shards = sorted(p.name for p in (output / "data").iterdir())

    code, out = run(write_spec(tmp_path, manifest, stages=[stage], max_error_fraction=0.5))
    assert code == EXIT_OK
    assert "already complete" in out and "within max_error_fraction 0.5" in out
    code, out = run(write_spec(tmp_path, manifest, stages=[stage], max_error_fraction=0.2))
    assert code == EXIT_ROWS_FAILED
    assert "already complete" in out and "over max_error_fraction 0.2" in out
    # Nothing ran again: the output is as the first run left it.
    assert (output / "_stats.json").read_text() == first
    assert sorted(p.name for p in (output / "data").iterdir()) == shards

    # Another manifest, whose ids the output does not hold: --overwrite leaves only its ids.
    other = [{"id": "other-0", "prompt": "a green star"}, {"id": "other-1", "prompt": "a white cross"}]
    write_manifest(str(tmp_path / "m.parquet"), other)
    code, _ = run(write_spec(tmp_path, manifest, stages=[stage]), "--overwrite")
    assert code == EXIT_OK
    assert sorted(rows_by_id(output)) == ["other-0", "other-1"]
    assert not set(shards) & {p.name for p in (output / "data").iterdir()}
    stats = stats_of(output)
    assert (stats.rows, stats.ok, stats.error, len(stats.runs)) == (2, 2, 0, 1)
