"""Nightly batches with real parts: a dated spec on moto's S3, `shardgen submit` and `shardgen
nightly` against a real `ray start --head` on 127.0.0.1 that wants Ray's token authentication,
the nights read back as one Hive-partitioned dataset, and the history at the nightly root.

The head is started with a planted AWS secret in its environment (where the jobs read their
credentials) and the same secret in this process's (the submitter's): neither the submissions
nor the jobs' logs may carry it, nor the Jobs API token.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import secrets
import subprocess
import sys
import threading
from datetime import date
from pathlib import Path

import boto3
import pytest
import yaml
from ray.job_submission import JobSubmissionClient

from pipeline import nightly, storage, submit
from pipeline.cli import main
from pipeline.dates import partition
from pipeline.errors import SpecError
from pipeline.spec import parse_spec
from pipeline.stats import Stats
from tests import ray_head as heads
from tests.conftest import prompts_manifest, write_manifest

PLANTED = "planted-" + secrets.token_hex(16)  # long enough that storage.redact treats it as a credential
NIGHTS = {date(2026, 11, 26): 2, date(2026, 11, 27): 3, date(2026, 11, 28): 4}  # rows per night


def _cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(argv))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def cluster(environment, s3_endpoint, tmp_path_factory):
    """A token-authenticated head, a bucket, and a dated spec on it; this process submits with the
    token from a file (RAY_AUTH_TOKEN_PATH) and no RAY_AUTH_MODE, as in a fresh shell."""
    token = secrets.token_hex(16)
    token_file = tmp_path_factory.mktemp("auth") / "auth_token"
    token_file.write_text(token + "\n")
    venv_bin = str(Path(sys.executable).parent)
    head_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "AWS_SECRET_ACCESS_KEY": PLANTED,
                "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}  # `python` in the entrypoint is this one
    mine = {"RAY_AUTH_TOKEN_PATH": str(token_file), "AWS_SECRET_ACCESS_KEY": PLANTED}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in mine.items():
            mp.setenv(name, value)
        for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"):
            mp.delenv(name, raising=False)
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="nightly")
        spec = "s3://nightly/jobs/nightly.yaml"
        storage.write_bytes(spec, yaml.safe_dump({
            "manifest": "s3://nightly/manifests/{date}.parquet",
            "output": "s3://nightly/datasets/shapes",
            "stages": [{"kind": "text_to_image", "model": "builtin:tiny-sd", "steps": 2, "width": 32, "height": 32,
                        "batch_size": 4}],
        }).encode())
        with heads.ray_head(head_env) as head:
            yield {"head": head, "spec": spec, "root": "s3://nightly/datasets/shapes", "token": token}


def _manifest(night: date, rows: int, **extra) -> None:
    write_manifest(f"s3://nightly/manifests/{night}.parquet", prompts_manifest(rows, **extra))


def _table(out: str) -> list[list[str]]:
    """The rows of the table that `shardgen nightly` prints last (the jobs' logs come before it)."""
    lines = out.splitlines()
    head = max(i for i, line in enumerate(lines) if line.split()[:2] == ["night", "status"])
    return [line.split() for line in lines[head + 1:] if line.strip()]


def _jobs_of(head, night: date) -> list:
    return sorted((j for j in head.client.list_jobs() if j.submission_id and f"-{night:%Y%m%d}-" in j.submission_id),
                  key=lambda j: j.submission_id)


def _assert_no_secret(head, job, token: str) -> None:
    info = head.client.get_job_info(job.submission_id)
    shown = repr((info.entrypoint, info.metadata, info.runtime_env)) + head.client.get_job_logs(job.submission_id)
    assert PLANTED not in shown and token not in shown, shown
    assert "AWS_" not in repr(info.runtime_env), info.runtime_env


# --- dated specs, no cluster -----------------------------------------------------------------------


def test_dates_fill_every_uri_and_default_to_a_hive_partition():
    spec = parse_spec({"manifest": "s3://b/m/{date}/", "output": "s3://b/out",
                       "stages": [{"kind": "text_to_image", "model": "s3://b/models/{yesterday}"}]}, night="2026-03-01")
    assert spec.manifest == "s3://b/m/2026-03-01/"
    assert spec.output == "s3://b/out/date=2026-03-01"
    assert spec.stages[0].model == "s3://b/models/2026-02-28"  # the day before, across a month
    placed = parse_spec({"manifest": "m", "output": "s3://b/{date}/run"}, night="2026-03-01")
    assert placed.output == "s3://b/2026-03-01/run"  # a spec that places the night keeps its layout
    assert parse_spec({"manifest": "m", "output": "o"}).output == "o"  # undated, no night: unchanged
    with pytest.raises(SpecError, match=r"output: unknown placeholder \{data\}"):
        parse_spec({"manifest": "m", "output": "s3://b/{data}"})
    with pytest.raises(SpecError, match="--date"):
        parse_spec({"manifest": "m/{date}", "output": "o"}, night="28.11.2026")


def test_submission_ids_are_per_night_and_output():
    spec = {"manifest": "m/{date}", "output": "s3://b/out"}
    a, b = (nightly.Night(d, parse_spec(spec, night=d)) for d in (date(2026, 1, 1), date(2026, 1, 2)))
    assert submit.base_id("s3://b/jobs/My Job.yaml", a) == submit.base_id("s3://b/jobs/My Job.yaml", a)
    assert submit.base_id("s3://b/jobs/My Job.yaml", a).startswith("shardgen-my-job-20260101-")
    assert submit.base_id("j.yaml", a) != submit.base_id("j.yaml", b)
    other = nightly.Night(a.night, parse_spec({**spec, "output": "s3://b/other"}, night=a.night))
    assert submit.base_id("j.yaml", a) != submit.base_id("j.yaml", other)


def test_history_keeps_every_night_when_nights_finish_at_once(tmp_path):
    root = str(tmp_path / "nightly")
    specs = [parse_spec({"manifest": "m", "output": root}, night=date(2026, 1, d)) for d in range(1, 9)]
    stats = Stats(run_id="r", runs=["r"], rows=1, ok=1, error=0, errors_by_kind={}, shards=1, rows_this_run=1,
                  elapsed_s=1.0, images_per_s=1.0)
    barrier = threading.Barrier(len(specs))

    def finish(spec):
        barrier.wait()
        nightly.record(spec, stats)

    threads = [threading.Thread(target=finish, args=(s,)) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    nightly.record(specs[0], stats)  # a rerun of a night replaces its line
    assert [e.night for e in nightly.history(root)] == [f"2026-01-0{d}" for d in range(1, 9)]
    assert nightly.describe(root).count("2026-01-01") == 1


def test_nights_run_locally_and_catch_up(tmp_path, ray_local):
    """`shardgen run --date` records its night; `shardgen nightly` runs the missing one here,
    skips the finished one, and a second catch-up finds nothing to do."""
    first, second = date(2026, 10, 1), date(2026, 10, 2)
    for night, rows in ((first, 2), (second, 3)):
        write_manifest(str(tmp_path / f"m-{night}.parquet"), prompts_manifest(rows))
    spec = tmp_path / "nightly.yaml"
    spec.write_text(yaml.safe_dump({
        "manifest": str(tmp_path / "m-{date}.parquet"), "output": str(tmp_path / "nightly"),
        "stages": [{"kind": "text_to_image", "model": "builtin:tiny-sd", "steps": 2, "width": 32, "height": 32}],
    }))
    code, out = _cli("run", "--spec", str(spec), "--date", str(first))
    assert code == 0 and f"date={first}" in out, out
    code, out = _cli("nightly", "--spec", str(spec), "--from", str(first), "--to", str(second))
    assert code == 0, out
    table = [row[:5] for row in _table(out)]
    assert table == [[str(first), "complete", "2", "2", "0"], [str(second), "done", "3", "3", "0"]], out
    history = nightly.history(str(tmp_path / "nightly"))
    assert [(e.night, e.rows) for e in history] == [(str(first), 2), (str(second), 3)]
    code, out = _cli("nightly", "--spec", str(spec), "--missing", "--to", str(second))
    assert code == 0 and f"every night from {first} to {second} is complete" in out, out


# --- against the head ------------------------------------------------------------------------------


def test_the_head_wants_the_token(cluster):
    with pytest.raises(Exception, match=r"(?i)auth|401|unauthori"):
        JobSubmissionClient(cluster["head"].address).list_jobs()


def test_ray_job_submit_as_the_readme_shows_it(cluster):
    """`ray job submit` sends the token only with RAY_AUTH_MODE=token, as the README says."""
    ray = str(Path(sys.executable).with_name("ray"))
    cmd = [ray, "job", "submit", "--address", cluster["head"].address, "--", "python", "-m", "jobs.generate", "--help"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower(), refused
    done = subprocess.run(cmd, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--spec" in done.stdout, done


def test_submit_a_night_then_again_is_refused(cluster):
    head, spec, night = cluster["head"], cluster["spec"], date(2026, 11, 26)
    _manifest(night, NIGHTS[night])
    code, out = _cli("submit", "--spec", spec, "--date", str(night), "--address", head.address)
    assert code == 0, out
    code, again = _cli("submit", "--spec", spec, "--date", str(night), "--address", head.address)
    assert code == 2 and "already on the cluster" in again, again
    (job,) = _jobs_of(head, night)
    assert job.submission_id.endswith("-a1") and job.submission_id in out
    logs = io.StringIO()
    assert submit.follow(head.client, job.submission_id, logs) == 0, logs.getvalue()
    code, done = _cli("submit", "--spec", spec, "--date", str(night), "--address", head.address, "--wait")
    assert code == 0 and "already complete; nothing submitted" in done, done
    assert len(_jobs_of(head, night)) == 1
    stats = Stats.from_json(storage.read_bytes(storage.join(partition(cluster["root"], night), "_stats.json")))
    assert stats.runs == [stats.run_id] and stats.rows == NIGHTS[night]  # one run wrote the night's one output
    _assert_no_secret(head, job, cluster["token"])


def test_wait_exits_with_the_jobs_code_and_a_retry_is_the_next_attempt(cluster):
    head, spec = cluster["head"], cluster["spec"]
    night = date(2026, 11, 28)  # its manifest is not there yet: the job refuses it (exit 2, not just "failed")
    code, out = _cli("submit", "--spec", spec, "--date", str(night), "--address", head.address, "--wait")
    assert code == 2, out
    _manifest(night, NIGHTS[night])
    code, out = _cli("submit", "--spec", spec, "--date", str(night), "--address", head.address, "--wait")
    assert code == 0, out
    assert [j.submission_id[-3:] for j in _jobs_of(head, night)] == ["-a1", "-a2"]
    assert f"{NIGHTS[night]} rows ({NIGHTS[night]} ok, 0 error)" in out  # the job's log, followed
    for job in _jobs_of(head, night):
        _assert_no_secret(head, job, cluster["token"])


def test_catch_up_runs_only_the_missing_night(cluster):
    head, spec = cluster["head"], cluster["spec"]
    missing = date(2026, 11, 27)
    _manifest(missing, NIGHTS[missing])
    code, out = _cli("nightly", "--spec", spec, "--from", "2026-11-26", "--to", "2026-11-28", "--address", head.address)
    assert code == 0, out
    assert [(r[0], r[1], r[2]) for r in _table(out)] == [
        ("2026-11-26", "complete", "2"), ("2026-11-27", "done", "3"), ("2026-11-28", "complete", "4")], out
    assert [j.submission_id[-3:] for j in _jobs_of(head, missing)] == ["-a1"]
    code, out = _cli("nightly", "--spec", spec, "--missing", "--from", "2026-11-26", "--to", "2026-11-28",
                     "--address", head.address)
    assert code == 0 and "every night from 2026-11-26 to 2026-11-28 is complete" in out, out


def test_nights_read_back_as_one_partitioned_dataset(cluster, ray_local):
    import datasets
    import duckdb
    import pyarrow.dataset as ds
    import ray
    from ray.data.datasource import Partitioning

    want = {str(n): rows for n, rows in NIGHTS.items()}
    fs, path = storage.arrow_filesystem(cluster["root"])
    table = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive",
                       ignore_prefixes=[".", "_", "README"]).to_table()
    assert collections.Counter(table.column("date").to_pylist()) == want

    fsspec_fs, _ = storage.filesystem(cluster["root"])
    con = duckdb.connect()
    con.register_filesystem(fsspec_fs)
    counts = con.sql(f"SELECT date::VARCHAR, count(*) FROM read_parquet('{cluster['root']}/*/data/*.parquet', "
                     "hive_partitioning = true) GROUP BY 1").fetchall()
    assert dict(counts) == want

    rows = ray.data.read_parquet(path, filesystem=fs, partitioning=Partitioning("hive")).select_columns(["date"])
    assert collections.Counter(r["date"] for r in rows.take_all()) == want

    hf = datasets.Dataset(table)
    assert collections.Counter(hf["date"]) == want and hf.num_rows == sum(want.values())


def test_history_lists_each_night_once(cluster):
    entries = nightly.history(cluster["root"])
    assert [(e.night, e.rows) for e in entries] == [(str(n), rows) for n, rows in NIGHTS.items()]
    text = nightly.describe(cluster["root"]).splitlines()
    assert [line.split()[0] for line in text[2:]] == [str(n) for n in NIGHTS], text  # after the title and header
