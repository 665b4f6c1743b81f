"""Make tests/schemas/kuberay-crds.json from KubeRay's released CRDs (see README.md here).

    python tests/schemas/extract_kuberay.py KUBERAY_CHECKOUT TAG COMMIT > tests/schemas/kuberay-crds.json

Reads ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,raycronjobs}.yaml and keeps the
`v1` openAPIV3Schema of each, made small and made to check what the API server checks:
- descriptions dropped;
- pod templates, and each object's metadata, become references to Kubernetes' own
  PodTemplateSpec and ObjectMeta (kubernetes-validate's strict schemas), which is what the CRDs
  inline;
- the RayJob's rayClusterSpec and the RayCronJob's jobTemplate become references to the
  RayCluster's and the RayJob's spec when they are the same schema (checked here);
- every object schema that lists its properties and does not carry
  x-kubernetes-preserve-unknown-fields refuses other properties (additionalProperties: false),
  as `kubectl apply` with its default strict field validation does;
- `nullable: true` also allows null; CEL rules (x-kubernetes-validations) are dropped: a JSON
  Schema validator cannot run them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

K8S = "https://kubernetes.io/api/_definitions.json#/$defs/"
CRDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}
DROP = {"description", "x-kubernetes-validations"}


def _is_pod_template(node: dict) -> bool:
    props = node.get("properties", {})
    return set(props) == {"metadata", "spec"} and "containers" in props["spec"].get("properties", {})


def convert(node):
    if isinstance(node, list):
        return [convert(v) for v in node]
    if not isinstance(node, dict):
        return node
    if _is_pod_template(node):
        return {"$ref": K8S + "io.k8s.api.core.v1.PodTemplateSpec"}
    out = {k: convert(v) for k, v in node.items() if k not in DROP}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


def schema(bases: Path, kind: str) -> dict:
    crd = yaml.safe_load((bases / f"ray.io_{CRDS[kind]}.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    root = convert(version["schema"]["openAPIV3Schema"])
    root["properties"]["metadata"] = {"$ref": K8S + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    root["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    root["properties"]["kind"] = {"const": kind}
    root.pop("additionalProperties", None)
    root["additionalProperties"] = False
    root["required"] = sorted({"apiVersion", "kind", "metadata", *root.get("required", [])})
    return root


def _share(defs: dict, kind: str, path: list[str], target: str) -> None:
    """Replace the schema at ``path`` under ``kind`` by a reference to ``target``'s spec."""
    node = defs[kind]
    for key in path[:-1]:
        node = node["properties"][key]
    inner = node["properties"][path[-1]]
    if inner != defs[target]["properties"]["spec"]:
        raise SystemExit(f"{kind}.{'.'.join(path)} differs from {target}.spec: keep both")
    node["properties"][path[-1]] = {"$ref": f"#/$defs/{target}/properties/spec"}


def main(checkout: str, tag: str, commit: str) -> None:
    bases = Path(checkout) / "ray-operator/config/crd/bases"
    defs = {kind: schema(bases, kind) for kind in CRDS}
    _share(defs, "RayCronJob", ["spec", "jobTemplate"], "RayJob")  # before RayJob's own spec changes
    _share(defs, "RayJob", ["spec", "rayClusterSpec"], "RayCluster")
    out = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://shardgen.invalid/schemas/kuberay-crds.json",
        "x-origin": {
            "repository": "ray-project/kuberay", "tag": tag, "commit": commit,
            "files": [f"ray-operator/config/crd/bases/ray.io_{name}.yaml" for name in CRDS.values()],
            "made-by": "tests/schemas/extract_kuberay.py",
        },
        "$defs": defs,
    }
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
