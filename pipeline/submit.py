"""`shardgen submit`: one night of a spec as a job on a Ray cluster's Jobs API, under an id that
only that night's attempt can have.

The submission id is ``shardgen-{spec name}-{YYYYMMDD}-{hash of the night's output}-a{attempt}``.
Ray refuses a second job with an id it knows, finished or not, so two submitters racing for the
same night cannot both start it; a night whose last attempt failed or was stopped goes in as the
next attempt (which resumes the output), and one whose attempt still runs is refused here.

Nothing secret goes into the submission: the job reads its credentials from the cluster's own
environment (a Kubernetes Secret, or the shell that ran `ray start`), and the Jobs API token is
sent as a request header only.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shlex
import sys
import time
from pathlib import Path

from pipeline import storage
from pipeline.dates import parse_night
from pipeline.errors import EXIT_FAILED, EXIT_INVALID, EXIT_OK, EXIT_ROWS_FAILED, ShardgenError, SpecError
from pipeline.nightly import Night, Outcome, is_complete, load_nights, stats_of

ENTRYPOINT = ("python", "-m", "jobs.generate")
AGENT_WAIT_S = 60
_ATTEMPT = re.compile(r"-a(\d+)$")


class AlreadySubmitted(ShardgenError):
    """The night has an attempt on the cluster that has not ended: a second would write the same
    output twice at once."""

    exit_code = EXIT_INVALID


def auth_headers() -> dict[str, str]:
    """The Jobs API token as Ray's own clients find it (RAY_AUTH_TOKEN, the file in
    RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), unless RAY_AUTH_MODE=disabled. Ray's client sends it
    only where RAY_AUTH_MODE=token is set in the submitting shell too; a head started where a
    token file exists wants it whatever that shell says."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None):
    """A Jobs API client for ``address`` (else RAY_ADDRESS), e.g. http://127.0.0.1:8265."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SpecError("--address: no Ray cluster given; pass --address http://HEAD:8265 or set RAY_ADDRESS")
    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except (ConnectionError, RuntimeError) as err:
        raise ShardgenError(f"cannot use the Ray Jobs API at {address}: {storage.redact(str(err)).splitlines()[0]} "
                            "(is the address the dashboard's, port 8265? a head with token authentication wants "
                            "the token in ~/.ray/auth_token or RAY_AUTH_TOKEN)") from None


def base_id(spec_uri: str, night: Night) -> str:
    """The id of a night of a spec, without the attempt: readable (spec name, night) and
    distinct for each output (the hash)."""
    name = re.sub(r"[^a-z0-9]+", "-", Path(spec_uri).stem.lower()).strip("-")[:24] or "job"
    digest = hashlib.sha256(night.spec.output.encode()).hexdigest()[:8]
    return f"shardgen-{name}-{night.night:%Y%m%d}-{digest}"


def attempts(jobs, base: str) -> dict[int, object]:
    """The attempts of the night ``base`` among the cluster's jobs, by number."""
    found = {}
    for job in jobs:
        sid = job.submission_id or ""
        match = _ATTEMPT.search(sid)
        if match and sid[: match.start()] == base:
            found[int(match.group(1))] = job
    return found


def submit_night(jobs_api, spec_uri: str, night: Night, working_dir: str | None = None,
                 overrides: dict[str, str | None] | None = None) -> str | None:
    """Submit ``night`` unless it is complete, and return its submission id (None: the night was
    complete, nothing submitted); refuse while an attempt of it has not ended."""
    base = base_id(spec_uri, night)
    tried = attempts(jobs_api.list_jobs(), base)
    running = [j.submission_id for j in tried.values() if not j.status.is_terminal()]
    if running:
        raise AlreadySubmitted(f"night {night.night} of {spec_uri} is already on the cluster as {running[0]} "
                               f"(not ended); not submitted again (follow it: ray job logs --follow {running[0]})")
    if is_complete(night.spec):
        return None
    submission_id = f"{base}-a{max(tried, default=0) + 1}"
    flags = [a for k, v in (overrides or {}).items() if v is not None for a in (f"--{k}", v)]
    entrypoint = shlex.join([*ENTRYPOINT, "--spec", spec_uri, "--date", night.night.isoformat(), *flags])
    runtime_env = {"working_dir": working_dir} if working_dir else {}
    metadata = {"shardgen_spec": spec_uri, "shardgen_night": night.night.isoformat(),
                "shardgen_output": night.spec.output, "shardgen_attempt": submission_id.rsplit("-a", 1)[1]}
    try:
        _submit(jobs_api, entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env,
                metadata=metadata)
    except RuntimeError as err:
        if "already exists" in str(err):  # another submitter got this attempt's id first
            raise AlreadySubmitted(f"night {night.night} of {spec_uri} was just submitted as {submission_id} "
                                   "by someone else; not submitted again") from None
        raise ShardgenError(f"the Jobs API refused {submission_id}: {storage.redact(str(err))}") from None
    return submission_id


def _submit(jobs_api, **job) -> None:
    """Submit, waiting out a head that has just started: its Jobs API answers a little before
    its agent takes jobs ("No available agent to submit job, please try again later")."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            jobs_api.submit_job(**job)
            return
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def follow(jobs_api, submission_id: str, out=None) -> int:
    """Print the job's log as it comes and return its own exit code (0, 1, 2 or 3, as the
    shardgen run inside it ended; 1 where the job never ran its entry point)."""

    out = out or sys.stdout  # looked up now: a caller may have redirected it

    async def tail() -> None:
        async for lines in jobs_api.tail_job_logs(submission_id):
            out.write(storage.redact(lines))
            out.flush()

    asyncio.run(tail())
    info = jobs_api.get_job_info(submission_id)
    if str(info.status) == "SUCCEEDED":
        return EXIT_OK
    if info.driver_exit_code is not None:
        return info.driver_exit_code
    print(f"shardgen: job {submission_id} {info.status}: {info.message}", file=sys.stderr)
    return EXIT_FAILED


def run_remote(jobs_api, spec_uri: str, working_dir: str | None, overrides: dict, log=print):
    """A catch-up runner (pipeline.nightly.catch_up) that submits each night and waits for it."""

    def run(night: Night) -> Outcome:
        try:
            submission_id = submit_night(jobs_api, spec_uri, night, working_dir, overrides)
        except AlreadySubmitted as err:
            return Outcome(night.night, "running", EXIT_INVALID, error=str(err))
        if submission_id is None:
            return Outcome(night.night, "complete", EXIT_OK, stats_of(night.spec))
        log(f"shardgen nightly: submitted {submission_id}")
        code = follow(jobs_api, submission_id)
        status = {EXIT_OK: "done", EXIT_INVALID: "refused", EXIT_ROWS_FAILED: "too many errors"}.get(code, "failed")
        stats = stats_of(night.spec)
        return Outcome(night.night, status, code, stats if is_complete(night.spec) else None,
                       "" if code == EXIT_OK else f"job {submission_id} exited {code}")

    return run


def command(args) -> int:
    """`shardgen submit`: submit one night; with --wait, follow it and exit with its exit code."""
    overrides = {"manifest": args.manifest, "output": args.output}
    _, (night,) = load_nights(args.spec, [parse_night(args.date)], **overrides)
    jobs_api = client(args.address)
    submission_id = submit_night(jobs_api, args.spec, night, args.working_dir, overrides)
    if submission_id is None:
        print(f"shardgen: night {night.night}: {night.spec.output} is already complete; nothing submitted")
        return EXIT_OK
    print(f"shardgen: submitted night {night.night} as {submission_id} -> {night.spec.output}")
    if not args.wait:
        print(f"  follow it: ray job logs --follow {submission_id}")
        return EXIT_OK
    return follow(jobs_api, submission_id)
