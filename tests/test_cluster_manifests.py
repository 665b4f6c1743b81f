"""cluster/ agrees with the code: every YAML parses; the entrypoints run jobs.generate or
shardgen with flags its parser accepts; the nightly schedulers catch up a dated spec under
deterministic submission ids, with deadlines; the image and the clusters are at the installed Ray version; the image
installs this package; credentials come only from Secrets; the head runs no actors; GPU workers
ask for their GPUs; the model cache is mounted where SHARDGEN_CACHE points; the example job spec
fits a GPU worker. Static checks: no cluster and no network (the schemas: test_cluster_schemas.py)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

from pipeline.cli import parser
from pipeline.spec import load_spec_file

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
ENTRYPOINT = "-m jobs.generate"
SHARDGEN = re.compile(r"(^|\s)shardgen\s+(run|submit|nightly)\b")
CREDENTIAL = re.compile(r"AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|SECRET|TOKEN|PASSWORD|KEY")

def _documents() -> list[tuple[str, dict]]:
    docs = [(p.name, d) for p in sorted(CLUSTER.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]
    assert docs, "no YAML in cluster/"
    return docs


def _objects(kind: str | None = None) -> list[dict]:
    """The Kubernetes objects (documents with an apiVersion), of one kind if given."""
    return [d for _, d in _documents() if "apiVersion" in d and kind in (None, d["kind"])]


def _one(kind: str) -> dict:
    found = _objects(kind)
    assert len(found) == 1, f"expected one {kind} in cluster/, found {len(found)}"
    return found[0]


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def _containers(node) -> list[dict]:
    """Every container of every pod template under ``node``."""
    if isinstance(node, list):
        return [c for v in node for c in _containers(v)]
    if not isinstance(node, dict):
        return []
    own = node.get("containers", []) + node.get("initContainers", [])
    return own + [c for k, v in node.items() if k not in ("containers", "initContainers") for c in _containers(v)]


def _cluster_specs() -> list[dict]:
    return [_one("RayCluster")["spec"], *(job["spec"]["rayClusterSpec"] for job in _objects("RayJob"))]


def _gpu_worker(spec: dict) -> tuple[dict, dict]:
    group = spec["workerGroupSpecs"][0]
    return group, group["template"]["spec"]["containers"][0]


def _cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _entrypoint_args(command: str) -> tuple[str, list[str]]:
    """The shardgen command and its arguments in one shell command line: `python -m
    jobs.generate ARGS` is `shardgen run ARGS`."""
    lines = command.replace("\\\n", " ").splitlines()
    line = next(line for line in lines if ENTRYPOINT in line or SHARDGEN.search(line))
    if ENTRYPOINT in line:
        before, _, after = line.partition(ENTRYPOINT)
        assert shlex.split(before)[-1:] == ["python"], f"not run as `python {ENTRYPOINT}`: {line!r}"
        return "run", shlex.split(after.split(";")[0])
    words = shlex.split(line[SHARDGEN.search(line).start():].split(";")[0])
    return words[1], words[2:]


def _check_entrypoint(command: str):
    name, args = _entrypoint_args(command)
    try:
        parsed = parser().parse_args([name, *args])
    except SystemExit:
        raise AssertionError(f"shardgen {name} refuses the arguments {args} of {command!r}") from None
    assert parsed.spec.startswith("s3://") and parsed.spec.endswith((".yaml", ".yml", ".json")), parsed.spec
    return parsed


def _commands() -> list[str]:
    """Every command line in cluster/'s objects: RayJob entrypoints, shell scripts, and container
    commands given as lists."""
    lists = [shlex.join(c["command"] + c.get("args", [])) for c in _containers(_objects()) if "command" in c
             and "bash" not in c["command"]]
    return [s for s in _strings(_objects()) + lists if ENTRYPOINT in s or SHARDGEN.search(s)]


def test_every_yaml_is_a_kubernetes_object_or_a_valid_job_spec():
    kinds = set()
    for name, doc in _documents():
        if "apiVersion" in doc:
            if doc["kind"].startswith("Ray"):
                assert doc["apiVersion"] == "ray.io/v1", name
            kinds.add(doc["kind"])
        else:
            load_spec_file(CLUSTER / name)  # raises SpecError naming the field
    assert {"RayCluster", "RayJob", "CronJob", "RayCronJob"} <= kinds


def test_entrypoints_run_shardgen_with_flags_it_accepts():
    spec = importlib.util.find_spec("jobs.generate")
    assert spec is not None and Path(spec.origin) == REPO / "jobs" / "generate.py"
    commands = _commands()
    assert len(commands) >= 3, commands  # the RayJob's, the CronJob's and the RayCronJob's
    for command in commands:
        _check_entrypoint(command)


def test_the_entrypoint_check_refuses_what_shardgen_run_refuses():
    with pytest.raises(AssertionError, match="refuses"):
        _check_entrypoint("python -m jobs.generate --spec s3://b/job.yaml --outputs s3://b/x")
    with pytest.raises(AssertionError, match="refuses"):
        _check_entrypoint("python -m jobs.generate --output s3://b/x")  # --spec is required
    with pytest.raises(AssertionError, match="python"):
        _check_entrypoint("python3.9 -m jobs.generate --spec s3://b/job.yaml")
    with pytest.raises(AssertionError, match="refuses"):
        _check_entrypoint("shardgen nightly --spec s3://b/job.yaml --missing --adress http://h:8265")


def test_image_and_clusters_are_at_the_installed_ray_version():
    version = ray.__version__
    base = re.search(r"^FROM\s+rayproject/ray:(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert base, "cluster/Dockerfile is not FROM a rayproject/ray image"
    tag = base.group(1)
    assert tag.startswith(f"{version}-"), f"base image {tag} is not Ray {version}"
    assert re.search(r"-(gpu|cu\d+)\b", tag), f"base image {tag} has no CUDA"
    py = re.search(r"-py3(\d+)", tag)
    required = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert py and int(py.group(1)) >= int(re.search(r"3\.(\d+)", required).group(1)), (tag, required)
    for spec in _cluster_specs():
        assert spec["rayVersion"] == version
    for container in _containers(_objects()):
        assert container["image"].endswith(f"-ray{version}"), container["image"]


def test_dockerfile_installs_the_package():
    text = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    copied = {src for line in re.findall(r"^COPY\s+(.*)$", text, re.M)
              for src in [a for a in shlex.split(line) if not a.startswith("--")][:-1]}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert {"pyproject.toml", project["project"]["readme"], "pipeline", "jobs"} <= copied, copied
    installs = [shlex.split(line) for line in re.findall(r"^RUN\s+(.*)$", text, re.M) if "pip install" in line]
    assert any("." in args[args.index("install"):] for args in installs), installs
    # The installed package must hold jobs/, or `python -m jobs.generate` fails outside a checkout.
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert any(re.fullmatch(p.replace("*", ".*"), "jobs") for p in packages), packages
    ignore = [line.strip() for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    if "*" in ignore:
        assert all(f"!{src}" in ignore for src in copied), (copied, ignore)


def test_credentials_come_only_from_secret_refs():
    for name in (p.name for p in CLUSTER.iterdir()):
        text = (CLUSTER / name).read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"an AWS access key in cluster/{name}"
    assert not _objects("Secret"), "a Secret with its values belongs outside the repository"
    containers = _containers(_objects())
    for container in containers:
        for env in container.get("env", []):
            if CREDENTIAL.search(env["name"]):
                assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), env
    # The head (the driver reads the spec) and the workers (they read and write S3) get them.
    for spec in _cluster_specs():
        for container in (spec["headGroupSpec"]["template"]["spec"]["containers"][0], _gpu_worker(spec)[1]):
            names = {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names, container["name"]
    for name, doc in _documents():
        if "apiVersion" not in doc:
            assert not ({"key", "secret", "token"} & set(doc.get("storage") or {})), f"credentials in cluster/{name}"


def test_head_takes_no_work_and_serves_the_jobs_api():
    for spec in _cluster_specs():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        assert head["rayStartParams"].get("include-dashboard", "true") != "false"
        container = head["template"]["spec"]["containers"][0]
        assert 8265 in {p["containerPort"] for p in container.get("ports", [])}
        resources = container["resources"]
        assert "nvidia.com/gpu" not in {**resources.get("requests", {}), **resources.get("limits", {})}


def test_gpu_workers_request_their_resources_and_autoscale():
    for spec in _cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True
        group, container = _gpu_worker(spec)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["maxReplicas"] >= 1
        resources = container["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
        assert {"cpu", "memory"} <= set(resources["requests"])
        # The driver on the head must wait for the autoscaler rather than refuse (plan.check_fits).
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        head_env = {e["name"]: e.get("value") for e in head["env"]}
        assert head_env.get("SHARDGEN_AUTOSCALING") == "1"


def test_model_cache_volume_is_mounted_at_shardgen_cache():
    for spec in _cluster_specs():
        for pod in (spec["headGroupSpec"]["template"]["spec"], _gpu_worker(spec)[0]["template"]["spec"]):
            volumes = {v["name"] for v in pod.get("volumes", [])}
            container = pod["containers"][0]
            cache = next(e["value"] for e in container["env"] if e["name"] == "SHARDGEN_CACHE")
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert cache in mounts and mounts[cache] in volumes, (cache, mounts, volumes)


def test_rayjob_runs_on_the_raycluster_spec_and_cleans_up():
    job = _one("RayJob")["spec"]
    assert job["rayClusterSpec"] == _one("RayCluster")["spec"], "cluster/rayjob.yaml drifted from raycluster.yaml"
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    assert job["backoffLimit"] >= 0


def test_nightly_schedulers_catch_up_a_dated_spec_on_the_raycluster_with_deadlines():
    cluster = _one("RayCluster")["metadata"]["name"]
    cron, ray_cron = _one("CronJob")["spec"], _one("RayCronJob")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and cron["startingDeadlineSeconds"] > 0
    assert 0 < cron["jobTemplate"]["spec"]["activeDeadlineSeconds"] < 86400  # ends before the next night
    assert 0 < ray_cron["jobTemplate"]["activeDeadlineSeconds"] < 86400
    # The RayCronJob's RayJobs run on the long-running cluster, where the submission ids guard.
    assert ray_cron["jobTemplate"]["clusterSelector"] == {"ray.io/cluster": cluster}
    assert cron["schedule"] == ray_cron["schedule"] and cron["timeZone"] == ray_cron["timeZone"] == "Etc/UTC"
    nightly = [_check_entrypoint(c) for c in _commands() if SHARDGEN.search(c)]
    assert len(nightly) == 2, nightly
    for args in nightly:
        assert args.command == "nightly" and args.missing and args.address == f"http://{cluster}-head-svc:8265"
    # The spec they name is cluster/nightly-job.yaml uploaded: dated, so each night has its output.
    (spec_uri,) = {args.spec for args in nightly}
    assert spec_uri.endswith("/jobs/nightly.yaml")
    text = (CLUSTER / "nightly-job.yaml").read_text()
    assert "{date}" in text and f"s3://BUCKET/jobs/{Path(spec_uri).name}" in text
    first, second = (load_spec_file(CLUSTER / "nightly-job.yaml", night=d) for d in ("2026-11-27", "2026-11-28"))
    assert first.output != second.output and second.output.endswith("/date=2026-11-28")


def test_example_job_spec_fits_one_gpu_worker():
    spec = load_spec_file(CLUSTER / "job.yaml")
    _, worker = _gpu_worker(_one("RayCluster")["spec"])
    gpus = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    cpus = _cpus(worker["resources"]["requests"]["cpu"])
    for stage in spec.all_stages():
        # Left null, it would be 0 while the GPU workers are still at zero (plan._gpus).
        assert stage.gpus_per_actor is not None and 0 < stage.gpus_per_actor <= gpus, stage
        assert stage.cpus_per_actor <= cpus, stage
