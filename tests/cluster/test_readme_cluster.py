"""Every command in the README's Cluster section is checked: each one names files and objects that the other
tests validate (KubeRay's schemas, Ray's launcher schema, the pipelines Config), or is run by them.

A command this file does not know how to check fails the test, so the README cannot grow unchecked commands.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.config import Config
from tests.cluster.cluster_files import MANIFESTS, cluster_spec, containers, manifest

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = "cluster/launcher/aws.yaml"


def _cluster_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## Cluster\n(.*?)(?=^## )", readme, flags=re.S | re.M)
    assert match, "README.md has no '## Cluster' section"
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", match.group(1), flags=re.S):
        for line in block.splitlines():
            command = re.split(r"\s+#", line)[0].strip()
            if command:
                commands.append(command)
    return commands


def _head_port(name: str) -> int:
    (head,) = cluster_spec("RayCluster")["headGroupSpec"]["template"]["spec"]["containers"]
    (port,) = [p["containerPort"] for p in head["ports"] if p["name"] == name]
    return port


def _check_job_submit(argv: list[str]) -> None:
    assert argv[:3] == ["ray", "job", "submit"], argv
    split = argv.index("--")
    options, entrypoint = argv[3:split], argv[split + 1 :]
    assert options[options.index("--address") + 1] == f"http://127.0.0.1:{_head_port('dashboard')}"
    assert options[options.index("--working-dir") + 1] == "."
    assert entrypoint[:4] == ["python", "-m", "pipelines.backfill", "--config"], entrypoint
    Config.from_yaml(ROOT / entrypoint[4])


def check(command: str) -> None:
    """Raise unless the command is one whose inputs the cluster tests validate."""
    argv = shlex.split(command)
    cluster_name = manifest("RayCluster")["metadata"]["name"]
    if argv[:2] == ["docker", "build"]:
        assert argv[argv.index("-f") + 1] == "cluster/Dockerfile" and argv[-1] == "."
        tag = argv[argv.index("-t") + 1]
        assert {c["image"] for kind in MANIFESTS for c in containers(cluster_spec(kind))} == {tag}
    elif argv[:3] == ["kubectl", "apply", "-f"]:
        assert argv[3] in {f"cluster/kuberay/{name}" for name in MANIFESTS.values()}, argv[3]
    elif argv[:2] == ["kubectl", "port-forward"]:
        # KubeRay names the head Service <cluster>-head-svc.
        assert argv[2] == f"service/{cluster_name}-head-svc"
        assert argv[3] == f"{_head_port('dashboard')}:{_head_port('dashboard')}"
    elif argv[0] == "export":
        assignments = dict(a.split("=", 1) for a in argv[1:])
        assert assignments.pop("RAY_AUTH_MODE") == "token"
        # KubeRay keeps the token under `auth_token` in a Secret named after the cluster (no secretName set).
        auth = cluster_spec("RayCluster")["authOptions"]
        assert auth["mode"] == "token" and "secretName" not in auth
        expected = f"$(kubectl get secret {cluster_name} -o jsonpath='{{.data.auth_token}}' | base64 -d)"
        assert assignments == {"RAY_AUTH_TOKEN": expected}
    elif argv[:2] == ["ray", "get-auth-token"]:
        # Run by test_launcher_schema.py::test_launcher_mounts_this_checkout_and_the_token_ray_generates.
        assert argv[2:] == ["--generate"]
        assert yaml.safe_load((ROOT / LAUNCHER).read_text())["file_mounts"]["~/.ray/auth_token"]
    elif argv[:1] == ["ray"] and argv[1] in ("up", "down", "dashboard"):
        # Validated against Ray's schema by test_launcher_schema.py.
        assert [a for a in argv[2:] if not a.startswith("-")] == [LAUNCHER]
    elif argv[:4] == ["ray", "job", "submit", "--address"]:
        _check_job_submit(argv)
    elif argv[:1] == ["RAY_AUTH_MODE=token"]:
        # The launcher cluster runs with token auth; the client must too.
        launcher = yaml.safe_load((ROOT / LAUNCHER).read_text())
        starts = [
            c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in launcher[key]
        ]
        assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
        _check_job_submit(argv[1:])
    else:
        raise AssertionError(f"no test checks this README command: {command}")


def test_readme_cluster_section_has_the_commands_of_each_path():
    commands = _cluster_commands()
    for needed in ("docker build", "kubectl apply", "ray up", "ray job submit"):
        assert any(needed in c for c in commands), needed


@pytest.mark.parametrize("command", _cluster_commands())
def test_readme_cluster_command_is_checked(command):
    check(command)


@pytest.mark.parametrize(
    ("command", "error"),
    [
        ("kubectl apply -f cluster/kuberay/raycluster.yml", AssertionError),
        ("ray up -y cluster/launcher/gcp.yaml", AssertionError),
        (
            "ray job submit --address http://127.0.0.1:8265 --working-dir . -- "
            "python -m pipelines.backfill --config cluster/jobs/nope.yaml",
            FileNotFoundError,
        ),
        ("docker build -f cluster/Dockerfile -t vlm-embed:latest .", AssertionError),
        ("kubectl port-forward service/vlm-embed-svc 8265:8265", AssertionError),
        ("helm install kuberay-operator kuberay/kuberay-operator", AssertionError),
    ],
)
def test_a_wrong_or_unknown_command_fails_the_check(command, error):
    with pytest.raises(error):
        check(command)
