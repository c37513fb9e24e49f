"""The cluster-launcher YAML is one `ray up` accepts: checked against the schema in Ray's own wheel."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.cluster.cluster_files import base_image

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "cluster" / "launcher" / "aws.yaml"


def _launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def _ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).with_name("ray-schema.json")
    return json.loads(path.read_text())


def test_launcher_validates_against_the_schema_ray_ships():
    jsonschema.validate(_launcher(), _ray_schema())


def test_launcher_survives_the_preparation_ray_up_does_before_calling_the_cloud():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(_launcher())
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c.update(max_worker=c.pop("max_workers")),
        lambda c: c["available_node_types"]["gpu"]["resources"].update(GPU="one"),
        lambda c: c["available_node_types"]["gpu"].pop("node_config"),
        lambda c: c["docker"].update(imag=c["docker"].pop("image")),
    ],
    ids=["misspelt-top-level-key", "non-integer-resource", "missing-node-config", "misspelt-docker-key"],
)
def test_schema_check_rejects_a_broken_launcher(break_it):
    config = copy.deepcopy(_launcher())
    break_it(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _ray_schema())


def test_launcher_has_a_cpu_head_and_autoscaling_gpu_workers():
    config = _launcher()
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    workers = [t for name, t in node_types.items() if name != config["head_node_type"]]
    gpu_workers = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers, "no worker type provides a GPU"
    for worker in gpu_workers:
        assert worker["min_workers"] < worker["max_workers"] <= config["max_workers"]


def test_launcher_runs_the_base_of_the_project_image():
    assert _launcher()["docker"]["image"] == base_image()


def test_launcher_starts_ray_with_token_auth_and_a_local_only_dashboard():
    config = _launcher()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        assert "RAY_AUTH_MODE=token" in start, key
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start


def test_launcher_mounts_this_checkout_and_the_token_ray_generates(tmp_path):
    mounts = _launcher()["file_mounts"]
    checkout = [local for local in mounts.values() if (ROOT / local).resolve() == ROOT]
    assert checkout, f"the launcher does not sync this checkout: {mounts}"
    assert any("-e ~/vlm-embed" in c for c in _launcher()["setup_commands"])
    # The README generates the token with `ray get-auth-token --generate`; the launcher mounts that file.
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    ray_cli = Path(sys.executable).with_name("ray")
    result = subprocess.run(
        [str(ray_cli), "get-auth-token", "--generate"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    token_mounts = [local for remote, local in mounts.items() if remote == "~/.ray/auth_token"]
    assert token_mounts == ["~/.ray/auth_token"]
    token_file = Path(token_mounts[0].replace("~", str(tmp_path), 1))
    assert token_file.read_text().strip() == result.stdout.strip()
