"""Shared fixtures: a real S3 API (moto's server on 127.0.0.1), a local Ray, a private model cache;
and the test tiers (docs/testing.md).

Tiers: a test that starts Ray, a subprocess or a server is an `integration` test; `make test-fast`
runs the others (`-m "not integration"`). The mark is given here, in one place, never by hand:
a test is integration when it uses a fixture that starts one of them (INTEGRATION_FIXTURES, or any
fixture built on one) or is listed in INTEGRATION_TESTS (whose tests start them by
themselves: the CLI in a subprocess, a job through `run_job`). In the fast tier a test that starts
Ray, a subprocess or a server anyway fails, naming this file, instead of slowing the tier silently.
Bench, GPU bench, training and synth-eval runs are also `slow` (SLOW_TESTS); `make test` runs all.

The environment is set up before Ray starts so that Ray's workers inherit it: test credentials,
the model cache folder, and (once the S3 server runs: `s3_endpoint`) the S3 endpoint. Ray Data's
no-progress timeout is cut from 30 minutes to RAY_DATA_NO_PROGRESS_S: a stalled job fails its test
instead of waiting (Ray Data reads the variable when it is imported, so it is set here, before any
test module imports it; Ray's workers and the tests' subprocesses inherit it).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import socket
import subprocess

import boto3
import pytest
import ray

from pipeline.cluster import retry_local_start
from pipeline.spec import parse_spec
from tests.helpers import free_port

RAY_DATA_NO_PROGRESS_S = 600

# Fixtures that start Ray, a subprocess or a server; a test using one, or a fixture built on one,
# is an integration test.
INTEGRATION_FIXTURES = {"ray_local", "s3_endpoint", "ray_head", "synth_output", "hub", "cluster", "browser"}
# Modules ("test_x.py") and tests ("test_x.py::test_y") that start Ray, a subprocess or a server in
# a way neither such a fixture nor STARTS below shows (a helper of another module, a library).
INTEGRATION_TESTS = {
    "test_node_loss.py", "test_worker_sigkill.py",  # through tests/fault_runs.py
    # torch.compile's inductor compiles in worker processes
    "test_stage_speed.py::test_compiled_stage_pads_calls_to_one_shape_and_gives_the_same_images",
}
# Runs that measure or train rather than check a promise (bench, GPU bench, training, synth-eval):
# the `slow` tier, as modules or module::test.
SLOW_TESTS = {
    "test_gpubench.py", "test_synth.py::test_small_experiment",
    "test_demo.py::test_bench_quick_runs_its_first_pair_and_reports_it",
    "test_training.py::test_ray_train_ddpm_loss_falls_and_saves_a_loadable_pipeline",
    "test_training.py::test_a_wall_clock_budget_ends_the_run_on_every_worker",
    "test_training.py::test_ddpm_trains_in_process_and_saves_a_ddpm_pipeline",
    "test_training.py::test_compare_sr_pairs_scenes_so_a_model_against_itself_differs_by_nothing",
    "test_training.py::test_caption_distillation_moves_what_it_trains_and_saves_a_loadable_upscaler",
}


def pytest_configure(config):
    # Before any test module is collected (and imports ray.data), and before any Ray starts.
    os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", str(RAY_DATA_NO_PROGRESS_S))
    config.addinivalue_line("markers", "integration: starts Ray, a subprocess or a server (given in conftest)")
    config.addinivalue_line("markers", "slow: a bench, GPU bench, training or synth-eval run (given in conftest)")


# xdist hands whole modules to its two workers (`--dist loadfile`) in the order they are collected,
# and left to itself it orders them by their number of tests, so the one-test fault scenarios came
# last and one worker ran them alone while the other had finished. The longest modules go first
# instead (longest processing time first), most to least as measured in one run of the suite; the
# short ones after them even out the two workers' ends. `--no-loadscope-reorder` (pyproject.toml)
# keeps this order.
LONGEST_FIRST = (
    "test_nightly.py", "test_training.py", "test_resume.py", "test_node_loss.py", "test_worker_sigkill.py",
    "test_families_generic.py", "test_s3_faults.py", "test_families.py", "test_demo.py", "test_security.py",
    "test_determinism.py", "test_stages.py", "test_resume_rules.py", "test_gpubench.py", "test_flows_plan.py",
    "test_progress.py", "test_bad_manifests.py", "test_hub.py", "test_stage_behaviour.py", "test_synth.py",
)


def longest_first(item) -> int:
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def listed(item, names: set[str]) -> bool:
    return bool({item.path.name, f"{item.path.name}::{item.originalname}"} & names)


# What in a test's code (or in a helper of its module it calls, or a fixture of its module it uses)
# starts a process or a Ray: such a test is integration with no list entry.
STARTS = re.compile(r"\bsubprocess\.(?:run|Popen|call|check_call|check_output)\b|\brun_shardgen\(|\bray\.init\(|"
                    r"\bretry_local_start\(|\brun_job\(")


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def starts_something(item) -> bool:
    fn = getattr(item, "function", None)
    module = inspect.getmodule(fn)
    if fn is None or module is None:
        return False
    own = [_source(fn)] + [_source(d.func) for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs
                           if getattr(d.func, "__module__", None) == module.__name__]
    helpers = {name for text in own for name in re.findall(r"\b([A-Za-z_]\w*)\(", text)}
    own += [_source(f) for name in helpers if inspect.isfunction(f := getattr(module, name, None))
            and f.__module__ == module.__name__]
    return any(STARTS.search(text) for text in own)


def is_integration(item) -> bool:
    return (listed(item, INTEGRATION_TESTS) or bool(INTEGRATION_FIXTURES & set(item.fixturenames))
            or starts_something(item))


def pytest_collection_modifyitems(items):
    for item in items:
        if is_integration(item):
            item.add_marker(pytest.mark.integration)
        if listed(item, SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
    items.sort(key=longest_first)  # stable: the rest keep their order


class StartedInFastTier(AssertionError):
    pass


@pytest.fixture(autouse=True)
def fast_tier_guard(request, monkeypatch):
    """A test not marked integration may not start Ray, a subprocess or a server: it fails, saying
    so, rather than slow `make test-fast` unseen (give it an integration fixture, or add its module
    to INTEGRATION_TESTS)."""
    if request.node.get_closest_marker("integration"):
        yield
        return

    def refuse(what):
        def refused(*args, **kwargs):
            raise StartedInFastTier(f"{request.node.nodeid} starts {what} but is not an integration test: "
                                    "see INTEGRATION_FIXTURES and INTEGRATION_TESTS in tests/conftest.py")
        return refused

    monkeypatch.setattr(ray, "init", refuse("Ray"))
    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse("a subprocess"))
    monkeypatch.setattr(socket.socket, "listen", refuse("a server"))
    yield


@pytest.fixture(scope="session")
def s3_endpoint(environment):
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    server.stop()
    if old is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = old


@pytest.fixture(scope="session", autouse=True)
def environment(tmp_path_factory):
    """Test credentials and a private model cache for every test; no server is started here (the
    fast tier has none): `s3_endpoint` adds AWS_ENDPOINT_URL when a test asks for S3."""
    cache = tmp_path_factory.mktemp("shardgen-cache")
    values = {
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


@pytest.fixture(scope="session")
def ray_local(environment, s3_endpoint):
    # The S3 server first: Ray's workers inherit AWS_ENDPOINT_URL from this process when Ray starts.
    retry_local_start(lambda: ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False))
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
