"""KubeRay's own CRD schemas (ray.io/v1), vendored so the manifests are validated offline, strictly.

`kuberay-crds-v1.json.gz` holds the `openAPIV3Schema` of the v1 RayCluster, RayJob and RayService CRDs,
copied from a KubeRay release. `strict_schema` makes every object that lists its properties reject unknown
fields, which is what `kubectl apply --validate=strict` does: a misspelt field fails here instead of being
silently pruned by the API server.

Regenerate from a KubeRay checkout (e.g. after bumping the operator version):

    python -m tests.cluster.kuberay_schemas /path/to/kuberay v1.7.0
"""

from __future__ import annotations

import copy
import gzip
import json
import sys
from pathlib import Path
from typing import Any

SCHEMA_FILE = Path(__file__).with_name("kuberay-crds-v1.json.gz")
CRD_FILES = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}


def load() -> dict[str, Any]:
    """The vendored bundle: {"kuberay_version", "source", "schemas": {kind: openAPIV3Schema}}."""
    return json.loads(gzip.decompress(SCHEMA_FILE.read_bytes()))


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy where objects with declared properties allow no other keys (unless marked open)."""
    schema = copy.deepcopy(schema)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def main(argv: list[str]) -> None:
    import yaml

    checkout, version = Path(argv[0]), argv[1]
    bases = checkout / "ray-operator" / "config" / "crd" / "bases"
    schemas = {}
    for kind, plural in CRD_FILES.items():
        crd = yaml.safe_load((bases / f"ray.io_{plural}.yaml").read_text())
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas[kind] = v1["schema"]["openAPIV3Schema"]
    bundle = {
        "kuberay_version": version,
        "source": "https://github.com/ray-project/kuberay/tree/"
        f"{version}/ray-operator/config/crd/bases (Apache-2.0)",
        "schemas": schemas,
    }
    data = json.dumps(bundle, sort_keys=True, separators=(",", ":")).encode()
    SCHEMA_FILE.write_bytes(gzip.compress(data, mtime=0))
    print(f"wrote {SCHEMA_FILE} ({len(data)} bytes of JSON)")


if __name__ == "__main__":
    main(sys.argv[1:])
