"""Shared fixtures: a real S3 API (moto's server on 127.0.0.1), a local Ray, a private model cache.

The environment is set up before Ray starts so that Ray's workers inherit it: the S3 endpoint and
test credentials, and the model cache folder. Ray Data's no-progress timeout is cut from 30
minutes to RAY_DATA_NO_PROGRESS_S: a stalled job fails its test instead of waiting (Ray Data reads
the variable when it is imported, so it is set here, before any test module imports it; Ray's
workers and the tests' subprocesses inherit it).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipeline import storage
from pipeline.spec import JobSpec, parse_spec

RAY_DATA_NO_PROGRESS_S = 600


def pytest_configure(config):
    # Before any test module is collected (and imports ray.data), and before any Ray starts.
    os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", str(RAY_DATA_NO_PROGRESS_S))


# The two fault scenarios are the longest tests, and by file name they would be handed out among
# the last: one worker then ran one alone while the other idled (1172 s against 1071 s). First,
# they run side by side, one on each xdist worker.
FIRST = ("test_node_loss.py", "test_worker_sigkill.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in FIRST)  # stable: the rest keep their order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    yield endpoint
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def environment(tmp_path_factory, s3_endpoint):
    cache = tmp_path_factory.mktemp("shardgen-cache")
    values = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "SHARDGEN_CACHE": str(cache),
        # No usage reporting from the tests' Rays: it costs each Ray a collector actor (a process).
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield values
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


RAY_START_TRIES = 3


def start_ray(start, clean_up=ray.shutdown):
    """``start()``'s result. On a busy machine a raylet whose agents are slow to report their ports
    aborts at start ("The current node timed out during startup"): clean up and start again
    rather than fail the test."""
    for attempt in range(1, RAY_START_TRIES + 1):
        try:
            return start()
        except Exception as err:  # noqa: BLE001 - only the start-up time-out is retried
            clean_up()
            if "timed out during startup" not in str(err) or attempt == RAY_START_TRIES:
                raise
            print(f"Ray did not start (try {attempt} of {RAY_START_TRIES}): {err}")


@pytest.fixture(scope="session")
def ray_local(environment):
    start_ray(lambda: ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False))
    yield
    ray.shutdown()


@pytest.fixture
def bucket(s3_endpoint, request):
    # The readable start of the test's name, plus a hash of its whole id: parametrized cases whose
    # names share the first 40 characters still get buckets of their own.
    readable = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"test-{readable}-{hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


def write_manifest(uri: str, rows: list[dict] | pa.Table) -> str:
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue().to_pybytes())
    return uri


def read_output(uri: str) -> pa.Table:
    fs, path = storage.arrow_filesystem(uri)
    return pq.read_table(f"{path}/data", filesystem=fs)


def prompts_manifest(n: int, **extra) -> list[dict]:
    colours = ["red", "green", "blue", "yellow"]
    return [{"id": f"row-{i:03d}", "prompt": f"a {colours[i % 4]} circle on a white background", **extra}
            for i in range(n)]


def small_spec(manifest: str, output: str, **stage) -> JobSpec:
    """A fast text_to_image job: 32x32, 4 steps."""
    return parse_spec({
        "manifest": manifest,
        "output": output,
        "stages": [{"kind": "text_to_image", "steps": 4, "width": 32, "height": 32, "batch_size": 4, **stage}],
    })


@pytest.fixture(scope="session")
def synthetic_output(tmp_path_factory):
    """A finished output written through the sink without diffusion (tests/synthetic_output.py):
    260 rows of 32x32 random PNGs, 26 error rows, markup prompts; 4 shards, 6 row groups."""
    from tests.synthetic_output import build

    root = tmp_path_factory.mktemp("synthetic-output")
    return build(str(root / "out"), str(root / "manifest.parquet"), rows=260, size=32, rows_per_shard=120,
                 rows_per_task=130)
SYNTH_CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="session")
def synth_output(tmp_path_factory, ray_local):
    """A small labelled, split and filtered output, made from a class list and a template by the
    synthetic-data manifest builder: (output folder, manifest table, stats)."""
    from pipeline.job import run_job
    from pipeline.synth import manifest as synth_manifest

    root = tmp_path_factory.mktemp("synth")
    (root / "classes.yaml").write_text("classes: [circle, {name: square, synonyms: [box]}, triangle]\n")
    (root / "templates.yaml").write_text(
        'templates: ["{a_colour} {class} on {a_background} background"]\n'
        "slots: {colour: [red, orange, blue], background: [white, black]}\n")
    table = synth_manifest.main(str(root / "classes.yaml"), str(root / "templates.yaml"), per_class=4, seed=3,
                                splits="train=0.5,validation=0.25,test=0.25", output=str(root / "m.parquet"))
    spec = parse_spec({
        "manifest": str(root / "m.parquet"), "output": str(root / "out"),
        "stages": [{"kind": "text_to_image", "model": "builtin:shapes-t2i", "steps": 4, "width": 32, "height": 32,
                    "batch_size": 4}],
        "filters": {"confidence": {}},
    })
    return root / "out", table, run_job(spec)
