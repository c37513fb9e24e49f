"""Reading the files under cluster/: the KubeRay manifests and the Dockerfile (enough of it for the tests)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path, PurePosixPath

import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
MANIFESTS = {"RayCluster": "raycluster.yaml", "RayJob": "rayjob.yaml", "RayService": "rayservice.yaml"}


def manifest(kind: str) -> dict:
    (doc,) = list(yaml.safe_load_all((CLUSTER / "kuberay" / MANIFESTS[kind]).read_text()))
    return doc


def cluster_spec(kind: str) -> dict:
    """The RayCluster spec a manifest runs (its own, or the one inside a RayJob or RayService)."""
    spec = manifest(kind)["spec"]
    return {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }[kind]


def containers(spec: dict) -> list[dict]:
    """Every container of a cluster spec: the head's and each worker group's."""
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def dockerfile_instructions() -> list[tuple[str, list[str]]]:
    """(INSTRUCTION, arguments) of cluster/Dockerfile, continuation lines joined, comments dropped."""
    text = (CLUSTER / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (parts[0].upper(), parts[1:])
        for parts in (shlex.split(line) for line in joined.splitlines())
        if parts
    ]


def base_image() -> str:
    (image,) = [args[0] for op, args in dockerfile_instructions() if op == "FROM"]
    return image


def image_copies() -> list[tuple[str, PurePosixPath]]:
    """(repository source, absolute destination in the image) of every COPY."""
    workdir, copies = PurePosixPath("/"), []
    for op, args in dockerfile_instructions():
        if op == "WORKDIR":
            workdir = workdir / args[0]
        elif op == "COPY":
            *sources, dest = [a for a in args if not a.startswith("--")]
            for source in sources:
                copies.append((source, workdir / dest / (Path(source).name if dest.endswith("/") else "")))
    return copies


def repo_path_of_image_path(image_path: str) -> Path:
    """The file of this repository that the image holds at `image_path` (via the Dockerfile's COPYs)."""
    target = PurePosixPath(image_path)
    for source, dest in image_copies():
        if target == dest or dest in target.parents:
            return ROOT / source / target.relative_to(dest)
    raise AssertionError(f"{image_path} is not copied into the image by cluster/Dockerfile")
