"""`shardgen inspect` on DuckDB: what it shows, --where, --json, --save, S3, flat memory, a real job."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli, nightly, storage
from pipeline.row_groups import MAX_BYTES, MAX_ROWS, row_group_size
from pipeline.spec import parse_spec
from pipeline.stats import Stats
from tests.helpers import small_spec, write_manifest
from tests.synthetic_output import ERRORS, build

REPO = Path(__file__).resolve().parents[1]


def inspect_json(capsys, output: str, *flags: str) -> dict:
    assert cli.main(["inspect", output, "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_summary_shows_counts_errors_times_models_and_shards(synthetic_output, capsys):
    s = inspect_json(capsys, synthetic_output.output)
    assert s["finished"] is True and s["where"] is None
    assert s["rows"] == synthetic_output.rows == s["recorded"]["rows"]
    assert s["status"] == {"ok": synthetic_output.ok, "error": synthetic_output.rows - synthetic_output.ok}
    kinds = {e["kind"]: e for e in s["errors"]}
    assert set(kinds) == {m.split(":")[0] for m in ERRORS}
    assert sum(e["rows"] for e in s["errors"]) == len(synthetic_output.error_ids)
    for e in s["errors"]:
        assert e["example_id"] in synthetic_output.error_ids and e["example"].startswith(e["kind"] + ":")
    [times] = s["seconds_per_row"]
    assert times["stages"] == ["text_to_image"] and times["rows"] == synthetic_output.ok
    assert 0 < times["p50"] <= times["p90"] <= times["p99"] <= times["max"]
    assert s["sizes"] == [{"width": 32, "height": 32, "rows": synthetic_output.ok}]
    assert {(m["model"], m["scheduler"]) for m in s["models"]} == {("builtin:tiny-sd", "ddpm"),
                                                                     ("builtin:tiny-sd", "euler")}
    # 130 rows per write task, 120 per shard, at most 100 per row group: 120 = 100 + 20, and 10.
    assert sorted((sh["rows"], sh["row_groups"]) for sh in s["shards"]) == [(10, 1), (10, 1), (120, 2), (120, 2)]
    assert all(sh["huggingface"] and sh["bytes"] > 0 for sh in s["shards"]) and s["huggingface_metadata"]
    assert [r["id"] for r in s["first_rows"]] == [f"row-{i:05d}" for i in range(5)]


def test_text_form_says_the_same(synthetic_output, capsys):
    assert cli.main(["inspect", synthetic_output.output]) == 0
    text = capsys.readouterr().out
    assert "finished (_SUCCESS present)" in text
    assert f"rows {synthetic_output.rows}: ok {synthetic_output.ok}, error 26" in text
    assert "prompt x9, e.g. row-00003: prompt: empty" in text
    assert "shards: 4, 260 rows, 6 row groups" in text and "every one with the huggingface schema metadata" in text


def test_where_applies_to_everything_shown(synthetic_output, capsys):
    s = inspect_json(capsys, synthetic_output.output, "--where", "status = 'error'")
    errors = len(synthetic_output.error_ids)
    assert s["rows"] == errors and s["status"] == {"ok": 0, "error": errors}
    assert s["seconds_per_row"] == [] and s["sizes"] == []
    assert sum(sh["matching"] for sh in s["shards"]) == errors
    assert {r["id"] for r in s["first_rows"]} <= set(synthetic_output.error_ids)

    s = inspect_json(capsys, synthetic_output.output, "--where", "prompt ILIKE '%castle%'", "--rows", "100")
    assert sorted(r["id"] for r in s["first_rows"]) == synthetic_output.script_ids
    assert s["rows"] == len(synthetic_output.script_ids) and s["errors"] == []


def test_other_statuses_are_counted_too(synthetic_output, tmp_path, capsys):
    shutil.copytree(synthetic_output.output, tmp_path / "out")
    shard = sorted((tmp_path / "out" / "data").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    status = ["filtered" if i in (0, 1) else s for i, s in enumerate(table.column("status").to_pylist())]
    pq.write_table(table.set_column(table.column_names.index("status"), "status", pa.array(status)), shard)
    s = inspect_json(capsys, str(tmp_path / "out"))
    assert s["status"] == {"ok": synthetic_output.ok - 2, "error": 26, "filtered": 2}
    assert cli.main(["inspect", str(tmp_path / "out")]) == 0
    assert f"rows 260: ok {synthetic_output.ok - 2}, error 26, filtered 2" in capsys.readouterr().out


def test_bad_where_is_refused_naming_it(synthetic_output, capsys, tmp_path):
    assert cli.main(["inspect", synthetic_output.output, "--where", "no_such_column = 1"]) == 2
    err = capsys.readouterr().err
    assert "--where 'no_such_column = 1'" in err and "no_such_column" in err
    sneaky = f"true); COPY (SELECT 1) TO '{tmp_path}/x.csv'; SELECT (1"
    assert cli.main(["inspect", synthetic_output.output, "--where", sneaky]) == 2
    assert "one condition, not several SQL statements" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_save_writes_the_images_of_the_rows_shown(synthetic_output, tmp_path, capsys):
    where = "status = 'ok' AND seed % 7 = 0"
    assert cli.main(["inspect", synthetic_output.output, "--rows", "4", "--where", where,
                     "--save", str(tmp_path / "saved")]) == 0
    assert "saved 4 image(s)" in capsys.readouterr().out
    fs, path = storage.arrow_filesystem(synthetic_output.output)
    table = pq.read_table(f"{path}/data", filesystem=fs, columns=["id", "seed", "status", "image_sha256"])
    expected = {i: h for i, s, st, h in zip(*(table.column(c).to_pylist() for c in table.column_names))
                if st == "ok" and s % 7 == 0}
    saved = {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "saved").iterdir()}
    assert len(saved) == 4 and all(expected[i] == h for i, h in saved.items())


def test_inspect_reads_s3_like_local(synthetic_output, bucket, capsys, tmp_path):
    fs, _ = storage.filesystem(bucket)
    fs.put(synthetic_output.output + "/", f"{bucket.removeprefix('s3://')}/out/", recursive=True)
    local = inspect_json(capsys, synthetic_output.output, "--where", "status = 'ok'")
    remote = inspect_json(capsys, f"{bucket}/out", "--where", "status = 'ok'", "--save", str(tmp_path / "s3"))
    assert remote.pop("output") == f"{bucket}/out" and local.pop("output") == synthetic_output.output
    assert remote.pop("saved")["images"] == 5
    assert remote == local


def test_row_groups_hold_at_most_100_rows_or_the_byte_budget():
    assert row_group_size(pa.table({"x": [b"a" * 100] * 1000})) == MAX_ROWS
    big = pa.table({"x": [b"a" * (6 << 20)] * 3})  # rows of 6 MiB, such as 2048x2048 PNGs
    rows, per_row = row_group_size(big), big.nbytes / big.num_rows
    assert rows * per_row <= MAX_BYTES < (rows + 1) * per_row and rows == 21


@pytest.fixture(scope="module")
def big_output(tmp_path_factory):
    """Random 256x256 PNGs (incompressible): about 140 MB of image bytes, 3 shards, 9 row groups."""
    root = tmp_path_factory.mktemp("big-output")
    return build(str(root / "out"), str(root / "manifest.parquet"), rows=800, size=256, rows_per_shard=300,
                 rows_per_task=400)


# Runs `shardgen ARGS` and then prints its own peak resident memory: VmHWM, the high-water mark of
# this program's memory since its exec (getrusage's ru_maxrss would include the forked test process).
MEASURED = ("import sys; from pipeline import cli; rc = cli.main(sys.argv[1:]); "
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')), file=sys.stderr); "
            "sys.exit(rc)")


def peak_rss(args: list[str]) -> tuple[int, float, str]:
    """Peak resident memory (bytes) and wall time of a `shardgen` command run as its own process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", MEASURED, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    kib = int(proc.stderr.split("VmHWM:")[1].split()[0])
    return kib * 1024, time.perf_counter() - start, proc.stdout


def test_memory_stays_flat_in_dataset_size(big_output, synthetic_output):
    on_disk = sum(p.stat().st_size for p in Path(big_output.output, "data").iterdir())
    assert on_disk > 0.9 * big_output.image_bytes > 100e6  # the shards are mostly image bytes
    small, _, _ = peak_rss(["inspect", synthetic_output.output, "--json"])
    big, seconds, out = peak_rss(["inspect", big_output.output, "--json"])
    assert json.loads(out)["rows"] == big_output.rows
    print(f"inspect --json of {big_output.rows} rows ({on_disk / 1e6:.0f} MB of shards): peak RSS "
          f"{big / 1e6:.0f} MB ({small / 1e6:.0f} MB on {synthetic_output.rows} rows), {seconds:.1f} s")
    # Reading the shards whole would add the image bytes (about 140 MB) to the peak.
    assert big - small < big_output.image_bytes / 4


def test_nights_root_lists_its_dated_outputs_and_their_history(synthetic_output, tmp_path, capsys):
    night = tmp_path / "date=2026-01-02"
    shutil.copytree(synthetic_output.output, night)
    (tmp_path / "date=2026-01-03" / "data").mkdir(parents=True)
    # The finished night's line in the nightly history (ROOT/_nights/), as a nightly run adds it.
    spec = parse_spec({"manifest": synthetic_output.manifest, "output": str(night)})
    nightly.record(spec, Stats.from_json((night / "_stats.json").read_text()))
    assert cli.main(["inspect", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "2 dated output(s)" in lines[0]
    out = synthetic_output
    assert lines[1] == f"  date=2026-01-02: finished, {out.rows} rows ({out.ok} ok, 26 error), 4 shard(s)"
    assert lines[2] == "  date=2026-01-03: NOT finished, 0 shard(s)"
    assert "1 finished night(s)" in lines[3]
    assert lines[5].split()[:4] == ["2026-01-02", str(out.rows), str(out.ok), "26"]
    assert cli.main(["inspect", str(tmp_path), "--json"]) == 0
    history = json.loads(capsys.readouterr().out)["history"]
    assert [(h["night"], h["rows"], h["output"]) for h in history] == [("2026-01-02", out.rows, str(night))]


def test_inspect_and_verify_a_real_job_through_the_cli(ray_local, tmp_path, capsys):
    manifest = write_manifest(str(tmp_path / "manifest.parquet"),
                              [{"id": f"r{i}", "prompt": "a red circle" if i else ""} for i in range(5)])
    spec = small_spec(manifest, str(tmp_path / "out"), model="builtin:tiny-sd")
    (tmp_path / "job.json").write_text(json.dumps(spec.public_dict()))
    assert cli.main(["run", "--spec", str(tmp_path / "job.json")]) == 3  # one error row
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "out"), "--save", str(tmp_path / "saved")]) == 0
    text = capsys.readouterr().out
    assert "finished (_SUCCESS present)" in text and "rows 5: ok 4, error 1" in text
    assert "prompt x1, e.g. r0: prompt: empty" in text and "builtin:tiny-sd" in text
    assert "sizes (ok rows): 32x32 x4" in text
    assert "every one with the huggingface schema metadata" in text
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["r1.png", "r2.png", "r3.png", "r4.png"]
    assert cli.main(["verify", str(tmp_path / "out"), "--manifest", manifest, "--deep"]) == 0
    assert "ok: 1 shard(s), 5 rows, 4 image(s) read" in capsys.readouterr().out
