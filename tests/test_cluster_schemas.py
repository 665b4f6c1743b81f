"""Every Kubernetes object in cluster/ against the real schemas, refusing unknown fields as
`kubectl apply` does (strict field validation): Kubernetes' own objects against
kubernetes-validate's strict schemas, KubeRay's against the openAPIV3Schema of KubeRay's released
CRDs (tests/schemas/kuberay-crds.json; tests/schemas/README.md says where it comes from), whose
pod templates and metadata are Kubernetes' strict PodTemplateSpec and ObjectMeta. Plus the checks
KubeRay's operator makes beyond its schema for what these files use. No cluster, no network."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = json.loads((REPO / "tests" / "schemas" / "kuberay-crds.json").read_text())
KUBERNETES = "1.37"
# KubeRay's limits on names (ray-operator/controllers/ray/utils/constant.go): a RayCronJob's
# child RayJobs are named <name>-<unix-minutes>.
MAX_NAME = {"RayCluster": 63, "RayJob": 47, "RayCronJob": 36}
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _objects() -> list[tuple[str, dict]]:
    found = [(f"{p.name}#{i}", d) for p in sorted(CLUSTER.glob("*.yaml"))
             for i, d in enumerate(yaml.safe_load_all(p.read_text())) if isinstance(d, dict) and "apiVersion" in d]
    assert found, "no Kubernetes objects in cluster/"
    return found


def _kubernetes_definitions() -> referencing.Resource:
    strict = f"kubernetes-json-schema/v{kubernetes_validate.utils.latest_version()}-local-strict/_definitions.json"
    assert kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version()) >= KUBERNETES
    return referencing.Resource.from_contents(kubernetes_validate.utils.schema_contents(strict, KUBERNETES))


def _kuberay_validator(kind: str) -> jsonschema.Draft202012Validator:
    registry = referencing.Registry().with_resources([
        (KUBERAY["$id"], referencing.Resource.from_contents(KUBERAY)),
        ("https://kubernetes.io/api/_definitions.json", _kubernetes_definitions()),
    ])
    return jsonschema.Draft202012Validator({"$ref": f"{KUBERAY['$id']}#/$defs/{kind}"}, registry=registry)


def validate(obj: dict) -> None:
    """Raise a jsonschema ValidationError where ``obj`` breaks its schema."""
    if obj["apiVersion"].startswith("ray.io/"):
        assert obj["kind"] in KUBERAY["$defs"], f"no KubeRay schema for {obj['kind']}"
        _kuberay_validator(obj["kind"]).validate(obj)
        _kuberay_operator_checks(obj)
    else:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def _kuberay_operator_checks(obj: dict) -> None:
    """What KubeRay's webhook and controllers refuse beyond the schema (utils/validation.go), for
    the fields these files use."""
    name, kind = obj["metadata"]["name"], obj["kind"]
    assert len(name) <= MAX_NAME[kind] and DNS1035.fullmatch(name), f"{kind} name {name!r}"
    jobs = {"RayJob": obj["spec"], "RayCronJob": obj["spec"].get("jobTemplate")}.get(kind)
    if jobs is not None:
        assert bool(jobs.get("rayClusterSpec")) != bool(jobs.get("clusterSelector")), \
            "a RayJob needs one of rayClusterSpec or clusterSelector"
        if jobs.get("clusterSelector"):
            assert jobs["clusterSelector"].get("ray.io/cluster"), "clusterSelector without ray.io/cluster"
            assert jobs.get("backoffLimit", 0) == 0, "backoffLimit is incompatible with clusterSelector"


@pytest.mark.parametrize("where,obj", _objects(), ids=lambda v: v if isinstance(v, str) else "")
def test_object_is_valid_against_its_schema(where, obj):
    validate(obj)


def _first(objects: list[tuple[str, dict]], kind: str) -> dict:
    return copy.deepcopy(next(obj for _, obj in objects if obj["kind"] == kind))


@pytest.mark.parametrize("kind,path", [
    ("CronJob", ["spec", "jobTemplate", "spec", "backofLimit"]),
    ("CronJob", ["spec", "jobTemplate", "spec", "template", "spec", "containers", 0, "imagePullPolic"]),
    ("RayCluster", ["spec", "headGroupSpec", "rayStartParam"]),
    ("RayCluster", ["spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resource"]),
    ("RayJob", ["spec", "rayClusterSpec", "enableInTreeAutoscale"]),
    ("RayJob", ["metadata", "label"]),
    ("RayCronJob", ["spec", "jobTemplate", "entryPoint"]),
    ("RayCronJob", ["spec", "concurrencyPolicy"]),  # a CronJob's field that a RayCronJob does not have
])
def test_a_misspelt_field_is_refused(kind, path):
    obj = _first(_objects(), kind)
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = 1
    with pytest.raises(jsonschema.ValidationError, match=re.escape(repr(path[-1]))):
        validate(obj)


def test_a_wrong_type_and_an_overlong_cron_name_are_refused():
    cron = _first(_objects(), "RayCronJob")
    cron["spec"]["jobTemplate"]["activeDeadlineSeconds"] = "a day"
    with pytest.raises(jsonschema.ValidationError, match="'a day'"):
        validate(cron)
    cron = _first(_objects(), "RayCronJob")
    cron["metadata"]["name"] = "shardgen-nightly-" + "x" * 20  # 37 characters
    with pytest.raises(AssertionError, match="RayCronJob name"):
        validate(cron)


def test_the_kuberay_schema_says_where_it_comes_from():
    origin = KUBERAY["x-origin"]
    assert origin["repository"] == "ray-project/kuberay" and re.fullmatch(r"v1\.\d+\.\d+", origin["tag"])
    assert re.fullmatch(r"[0-9a-f]{40}", origin["commit"])
    assert {"RayCluster", "RayJob", "RayCronJob"} <= set(KUBERAY["$defs"])
