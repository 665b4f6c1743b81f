"""Nightly batches with real parts: a dated spec on moto's S3, `shardgen submit` and `shardgen
nightly` against a real `ray start --head` on 127.0.0.1 that wants Ray's token authentication,
the nights read back as one Hive-partitioned dataset, and the history at the nightly root.

The head is started with a planted AWS secret in its environment (where the jobs read their
credentials) and the same secret in this process's (the submitter's): neither the submissions
nor the jobs' logs may carry it, nor the Jobs API token.
"""

from __future__ import annotations

import collections
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
from pipeline.dates import partition
from pipeline.errors import SpecError
from pipeline.spec import parse_spec
from pipeline.stats import Stats
from tests import ray_head as heads
from tests.helpers import as_a_fresh_process, cli_output, free_port, prompts_manifest, write_manifest

PLANTED = "planted-" + secrets.token_hex(16)  # long enough that storage.redact treats it as a credential
NIGHTS = {date(2026, 11, 26): 2, date(2026, 11, 27): 3, date(2026, 11, 28): 4}  # rows per night


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


def _statuses(out: str) -> dict[str, tuple[str, list[str], str]]:
    """{night: (status, [rows, ok, error, images/s], message)} from the table `shardgen nightly`
    prints (a status may hold spaces: the columns are cut where the header's words start)."""
    lines = out.splitlines()
    head = max(i for i, line in enumerate(lines) if line.split()[:2] == ["night", "status"])
    status, rows, message = (lines[head].index(word) for word in ("status", "rows", "message"))
    return {line[:status].strip(): (line[status:rows].strip(), line[rows:message].split(), line[message:].strip())
            for line in lines[head + 1:] if line.strip()}


@pytest.mark.parametrize("order, code", [(("refused", "failed"), 2), (("failed", "refused"), 1)])
def test_refused_and_failed_nights_and_the_first_failing_nights_exit_code(tmp_path, monkeypatch, order, code):
    """README: `refused` (exit 2: a missing manifest), `failed` (exit 1: here a cluster that does not
    answer), and `shardgen nightly` exits with the first failing night's code. No Ray starts."""
    nights = [date(2026, 5, 1), date(2026, 5, 2)]
    for night, status in zip(nights, order):
        if status == "failed":  # its manifest is there: what stops it is the dead cluster
            write_manifest(str(tmp_path / f"m-{night}.parquet"), prompts_manifest(1))
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    as_a_fresh_process(monkeypatch)
    spec = tmp_path / "nightly.yaml"
    spec.write_text(yaml.safe_dump({"manifest": str(tmp_path / "m-{date}.parquet"), "output": str(tmp_path / "n")}))
    got, out = cli_output("nightly", "--spec", str(spec), "--from", str(nights[0]), "--to", str(nights[1]))
    assert got == code, out
    table = _statuses(out)
    assert [table[str(n)][0] for n in nights] == list(order), out
    for night, status in zip(nights, order):
        message = table[str(night)][2]
        assert ("no Ray cluster answers" in message) if status == "failed" else (f"m-{night}.parquet" in message), out


def test_nights_run_locally_and_catch_up(tmp_path, ray_local):
    """`shardgen run --date` records its night; `shardgen nightly` runs the missing one here (one
    error row of three, over the default max_error_fraction 0: `too many errors`, exit 3), skips
    the finished one, and a second catch-up finds nothing to do."""
    first, second = date(2026, 10, 1), date(2026, 10, 2)
    write_manifest(str(tmp_path / f"m-{first}.parquet"), prompts_manifest(2))
    too_long = {"id": "row-too-long", "prompt": "x" * 2001}  # over limits.max_prompt_chars: an error row
    write_manifest(str(tmp_path / f"m-{second}.parquet"), [*prompts_manifest(2), too_long])
    spec = tmp_path / "nightly.yaml"
    spec.write_text(yaml.safe_dump({
        "manifest": str(tmp_path / "m-{date}.parquet"), "output": str(tmp_path / "nightly"),
        "stages": [{"kind": "text_to_image", "model": "builtin:tiny-sd", "steps": 2, "width": 32, "height": 32}],
    }))
    code, out = cli_output("run", "--spec", str(spec), "--date", str(first))
    assert code == 0 and f"date={first}" in out, out
    code, out = cli_output("nightly", "--spec", str(spec), "--from", str(first), "--to", str(second))
    assert code == 3, out
    table = _statuses(out)
    assert table[str(first)] == ("complete", ["2", "2", "0", "-"], ""), out
    status, counts, _ = table[str(second)]
    assert (status, counts[:3]) == ("too many errors", ["3", "2", "1"]), out
    history = nightly.history(str(tmp_path / "nightly"))
    assert [(e.night, e.rows, e.error) for e in history] == [(str(first), 2, 0), (str(second), 3, 1)]
    code, out = cli_output("nightly", "--spec", str(spec), "--missing", "--to", str(second))
    assert code == 0 and f"every night from {first} to {second} is complete" in out, out


# --- against the head ------------------------------------------------------------------------------


def test_the_head_wants_the_token(cluster):
    with pytest.raises(Exception, match=r"(?i)auth|401|unauthori"):
        JobSubmissionClient(cluster["head"].address).list_jobs()


def test_ray_job_submit_as_the_readme_shows_it(cluster):
    """`ray job submit` sends the token only with RAY_AUTH_MODE=token, as the README says, and the
    head runs the README's entrypoint (`jobs.generate`: its usage here; the nights below run it on
    real specs through the same Jobs API, submitted by `shardgen submit`)."""
    ray = str(Path(sys.executable).with_name("ray"))
    cmd = [ray, "job", "submit", "--address", cluster["head"].address, "--", "python", "-m", "jobs.generate", "--help"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower(), refused
    done = subprocess.run(cmd, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--spec" in done.stdout, done
    assert submit.ENTRYPOINT == ("python", "-m", "jobs.generate")


@pytest.fixture(scope="module")
def nights(cluster):
    """Every submission against the head, done once in the order the story needs (each test below
    checks its part, in whatever order the tests run): the first night submitted, submitted again,
    followed, and --wait on it once complete; the last night --wait before its manifest exists and
    again after; the middle night by `shardgen nightly`, and a second catch-up."""
    head, spec = cluster["head"], cluster["spec"]
    first, middle, last = NIGHTS
    on = ("--spec", spec, "--address", head.address)
    done: dict = {}
    _manifest(first, NIGHTS[first])
    done["submit"] = cli_output("submit", *on, "--date", str(first))
    done["again"] = cli_output("submit", *on, "--date", str(first))
    done["first_jobs"] = _jobs_of(head, first)
    logs = io.StringIO()
    codes = [submit.follow(head.client, job.submission_id, logs) for job in done["first_jobs"]]
    done["follow"] = codes, logs.getvalue()
    done["wait_complete"] = cli_output("submit", *on, "--date", str(first), "--wait")
    done["first_jobs_after"] = _jobs_of(head, first)
    done["wait_refused"] = cli_output("submit", *on, "--date", str(last), "--wait")  # no manifest yet: exit 2
    _manifest(last, NIGHTS[last])
    done["wait_retry"] = cli_output("submit", *on, "--date", str(last), "--wait")
    done["last_jobs"] = _jobs_of(head, last)
    _manifest(middle, NIGHTS[middle])
    window = ("--from", str(first), "--to", str(last))
    done["catch_up"] = cli_output("nightly", *on, *window)
    done["middle_jobs"] = _jobs_of(head, middle)
    done["catch_up_again"] = cli_output("nightly", *on, "--missing", *window)
    return done


def test_submit_a_night_then_again_is_refused(cluster, nights):
    head, night = cluster["head"], date(2026, 11, 26)
    code, out = nights["submit"]
    assert code == 0, out
    code, again = nights["again"]
    assert code == 2 and "already on the cluster" in again, again
    (job,) = nights["first_jobs"]
    assert job.submission_id.endswith("-a1") and job.submission_id in out
    codes, logs = nights["follow"]
    assert codes == [0], logs
    code, done = nights["wait_complete"]
    assert code == 0 and "already complete; nothing submitted" in done, done
    assert len(nights["first_jobs_after"]) == 1
    stats = Stats.from_json(storage.read_bytes(storage.join(partition(cluster["root"], night), "_stats.json")))
    assert stats.runs == [stats.run_id] and stats.rows == NIGHTS[night]  # one run wrote the night's one output
    _assert_no_secret(head, job, cluster["token"])


def test_wait_exits_with_the_jobs_code_and_a_retry_is_the_next_attempt(cluster, nights):
    night = date(2026, 11, 28)  # its manifest was not there yet: the job refused it (exit 2, not just "failed")
    code, out = nights["wait_refused"]
    assert code == 2, out
    code, out = nights["wait_retry"]
    assert code == 0, out
    assert [j.submission_id[-3:] for j in nights["last_jobs"]] == ["-a1", "-a2"]
    assert f"{NIGHTS[night]} rows ({NIGHTS[night]} ok, 0 error)" in out  # the job's log, followed
    for job in nights["last_jobs"]:
        _assert_no_secret(cluster["head"], job, cluster["token"])


def test_catch_up_runs_only_the_missing_night(nights):
    code, out = nights["catch_up"]
    assert code == 0, out
    assert [(r[0], r[1], r[2]) for r in _table(out)] == [
        ("2026-11-26", "complete", "2"), ("2026-11-27", "done", "3"), ("2026-11-28", "complete", "4")], out
    assert [j.submission_id[-3:] for j in nights["middle_jobs"]] == ["-a1"]
    code, out = nights["catch_up_again"]
    assert code == 0 and "every night from 2026-11-26 to 2026-11-28 is complete" in out, out


def test_nights_read_back_as_one_partitioned_dataset(cluster, nights, ray_local):
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


def test_history_lists_each_night_once(cluster, nights):
    entries = nightly.history(cluster["root"])
    assert [(e.night, e.rows) for e in entries] == [(str(n), rows) for n, rows in NIGHTS.items()]
    text = nightly.describe(cluster["root"]).splitlines()
    assert [line.split()[0] for line in text[2:]] == [str(n) for n in NIGHTS], text  # after the title and header
