"""The KubeRay manifests, the image and the job configs agree with each other and with the code.

Nothing here needs Kubernetes or Docker: the manifests are validated against KubeRay's own CRD schemas
(vendored, strict about unknown fields), and every name that must match across files is compared.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipelines.config import Config
from tests.cluster.cluster_files import (
    CLUSTER,
    MANIFESTS,
    ROOT,
    base_image,
    cluster_spec,
    containers,
    image_copies,
    manifest,
    repo_path_of_image_path,
)
from tests.cluster.kuberay_schemas import load as load_kuberay_schemas
from tests.cluster.kuberay_schemas import strict_schema

OBJECT_STORE_SCHEMES = ("s3://", "gs://", "az://", "abfss://")


def _validation_errors(doc: dict, kind: str) -> list[str]:
    schema = strict_schema(load_kuberay_schemas()["schemas"][kind])
    validator = jsonschema.Draft4Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def _readme_image_tag() -> str:
    builds = re.findall(r"docker build -f cluster/Dockerfile -t (\S+) \.", (ROOT / "README.md").read_text())
    assert builds, "README.md should show how to build the image (docker build -f cluster/Dockerfile -t ...)"
    assert len(set(builds)) == 1, f"README.md builds the image under several names: {builds}"
    return builds[0]


# --- KubeRay objects ---


@pytest.mark.parametrize("kind", MANIFESTS)
def test_manifest_is_one_ray_io_v1_object_of_its_kind(kind):
    doc = manifest(kind)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


@pytest.mark.parametrize("kind", MANIFESTS)
def test_manifest_validates_strictly_against_the_kuberay_crd_schema(kind):
    assert _validation_errors(manifest(kind), kind) == []


def test_strict_validation_rejects_misspelt_and_mistyped_fields():
    doc = manifest("RayCluster")
    misspelt = copy.deepcopy(doc)
    misspelt["spec"]["workerGroupSpec"] = misspelt["spec"].pop("workerGroupSpecs")
    nested = copy.deepcopy(doc)
    container = nested["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    mistyped = copy.deepcopy(doc)
    mistyped["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    for broken, field in ((misspelt, "workerGroupSpec"), (nested, "resource"), (mistyped, "maxReplicas")):
        errors = _validation_errors(broken, "RayCluster")
        assert any(field in e for e in errors), errors


def test_rayjob_and_rayservice_run_the_raycluster_spec():
    cluster = cluster_spec("RayCluster")
    assert cluster_spec("RayJob") == cluster
    assert cluster_spec("RayService") == cluster


def test_cluster_autoscales_a_gpu_worker_group_and_keeps_the_head_free():
    spec = cluster_spec("RayCluster")
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
    ]
    assert gpu_groups, "no worker group asks for a GPU"
    for group in gpu_groups:
        assert (
            0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        )
        assert group["maxReplicas"] > group["minReplicas"], "the autoscaler has no room to add GPU pods"
        resources = group["template"]["spec"]["containers"][0]["resources"]
        # Kubernetes requires requests == limits for extended resources such as GPUs.
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]


def test_clusters_use_token_auth_without_clashing_with_kuberays_token_secret():
    names = {manifest(kind)["metadata"]["name"] for kind in MANIFESTS}
    for kind in MANIFESTS:
        assert cluster_spec(kind)["authOptions"]["mode"] == "token", kind
        for container in containers(cluster_spec(kind)):
            secrets = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
            # KubeRay stores the Ray token in a Secret named after the cluster; ours must be another one.
            assert not secrets & names, (kind, container["name"], secrets & names)


# --- the image ---


def test_image_and_cluster_run_the_installed_ray_version():
    import ray

    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", base_image())
    assert match, f"unexpected base image {base_image()}"
    assert match.group(1) == ray.__version__
    python = (int(match.group(2)), int(match.group(3)))
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python >= tuple(int(p) for p in requires.removeprefix(">=").split(".")), requires
    for kind in MANIFESTS:
        assert cluster_spec(kind)["rayVersion"] == ray.__version__, kind


def test_every_container_runs_the_image_the_readme_builds():
    tag = _readme_image_tag()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert tag.endswith(f":{version}"), f"image tag {tag} is not the project version {version}"
    for kind in MANIFESTS:
        for container in containers(cluster_spec(kind)):
            assert container["image"] == tag, (kind, container["name"])


def test_dockerfile_copies_paths_that_exist_and_the_dockerignore_lets_in():
    patterns = [
        line.strip()
        for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    included = [p[1:] for p in patterns if p.startswith("!")]
    copies = image_copies()
    assert copies
    for source, _ in copies:
        assert (ROOT / source).exists(), source
        assert any(fnmatch.fnmatch(source, p) for p in included), (
            f"{source} is excluded from the build context"
        )
    assert ".venv" not in included and "*" in patterns, "the build context must not carry the virtualenv"


# --- the backfill job and its configs ---


def _job_configs() -> list[Path]:
    """Every pipelines Config YAML under cluster/ (manifests and the launcher are other schemas)."""
    others = {CLUSTER / "kuberay", CLUSTER / "launcher", CLUSTER / "dashboards"}
    return sorted(
        p for p in CLUSTER.rglob("*.y*ml") if p.suffix in (".yaml", ".yml") and not others & set(p.parents)
    )


def test_there_is_a_job_config_for_the_cluster():
    assert CLUSTER / "jobs" / "backfill-s3.yaml" in _job_configs()


@pytest.mark.parametrize("path", _job_configs(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_job_config_validates_as_a_pipelines_config(path):
    config = Config.from_yaml(path)
    assert config.sources, f"{path.name} backfills nothing"


@pytest.mark.parametrize("path", sorted((CLUSTER / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_job_configs_read_and_write_object_storage(path):
    """On a cluster, a local path would be one pod's disk: workers would not see the inputs or the table."""
    config = Config.from_yaml(path)
    assert config.table.uri.startswith(OBJECT_STORE_SCHEMES), config.table.uri
    assert config.table.storage_options, "say where the bucket is (region, endpoint) in storage_options"
    for source in config.sources:
        assert source.path.startswith(OBJECT_STORE_SCHEMES), source.path
    secrets = {
        k
        for k in config.table.storage_options
        if any(w in k.lower() for w in ("secret", "token", "key", "password"))
    }
    assert not secrets, f"credentials belong in the environment, not in the job config: {secrets}"


def test_rayjob_runs_the_backfill_entry_point_on_a_job_config_in_the_image():
    argv = shlex.split(manifest("RayJob")["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipelines.backfill"], argv
    assert argv[3:4] == ["--config"] and len(argv) == 5, argv
    config_file = repo_path_of_image_path(argv[4])
    assert config_file.is_file(), config_file
    Config.from_yaml(config_file)


def test_backfill_entry_point_takes_a_config_file():
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.backfill", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout


# --- the Serve app ---

APP_CONFIG = ("applications", 0, "args", "config")
# Where the RayService's serveConfigV2 may differ from serve/config.yaml (which runs offline on a laptop), and
# why; the tests below check each changed value.
CLUSTER_CHANGES = {
    ("http_options", "host"): "KubeRay's Serve Service reaches each pod's proxy on the pod IP, not loopback",
    (*APP_CONFIG, "embedder", "model"): "the model the RayJob embedded the corpus with",
    (*APP_CONFIG, "embedder", "recipe"): "the RayJob's recipe",
    (*APP_CONFIG, "embedder", "dimensions"): "the RayJob's dimensions",
    (*APP_CONFIG, "embedder", "compile_cache"): "the RayJob's compiled graphs, in object storage",
    (*APP_CONFIG, "table", "uri"): "the table the RayJob writes, in object storage",
    (*APP_CONFIG, "table", "storage_options"): "the RayJob's object-store options",
    (*APP_CONFIG, "serve", "num_gpus"): "one GPU per model replica",
}


def _differences(a, b, path: tuple = ()) -> set[tuple]:
    """The paths at which two parsed YAML documents differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return set().union(*(_differences(a.get(k), b.get(k), (*path, k)) for k in a.keys() | b.keys()))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return set().union(
            *(_differences(x, y, (*path, i)) for i, (x, y) in enumerate(zip(a, b, strict=True)))
        )
    return set() if a == b else {path}


def _serve_configs() -> tuple[dict, dict]:
    """(serve/config.yaml, the RayService's serveConfigV2), parsed."""
    local = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    return local, yaml.safe_load(manifest("RayService")["spec"]["serveConfigV2"])


def _app_config(serve_config: dict) -> Config:
    node = serve_config
    for key in APP_CONFIG:
        node = node[key]
    return Config.model_validate(node)


def test_rayservice_serve_config_is_serve_config_yaml_but_for_the_cluster_changes():
    local, cluster = _serve_configs()
    unexpected = _differences(local, cluster) - set(CLUSTER_CHANGES)
    assert not unexpected, (
        f"serveConfigV2 differs from serve/config.yaml at {sorted(unexpected, key=str)}: copy serve/config.yaml "
        "into cluster/kuberay/rayservice.yaml and reapply only the changes listed at the top of serveConfigV2"
    )


def test_serve_config_comparison_finds_any_other_change():
    local, cluster = _serve_configs()
    cluster["applications"][0]["args"]["config"]["serve"]["max_ongoing_requests"] = -1
    cluster["applications"][0]["args"]["config"]["serve"]["max_top_k"] = -1
    cluster["proxy_location"] = "Disabled"
    assert _differences(local, cluster) - set(CLUSTER_CHANGES) == {
        (*APP_CONFIG, "serve", "max_ongoing_requests"),
        (*APP_CONFIG, "serve", "max_top_k"),
        ("proxy_location",),
    }


def test_rayservice_embeds_queries_like_the_rayjob_and_searches_its_table():
    job = Config.from_yaml(repo_path_of_image_path(shlex.split(manifest("RayJob")["spec"]["entrypoint"])[-1]))
    app = _app_config(_serve_configs()[1])
    assert app.embedder.signature() == job.embedder.signature()
    assert app.embedder.compile_cache == job.embedder.compile_cache  # replicas load what the job compiled
    assert (app.table.uri, app.table.name, app.table.storage_options) == (
        job.table.uri,
        job.table.name,
        job.table.storage_options,
    )


def test_rayservice_serve_config_is_a_valid_serve_deploy_config_for_the_cluster():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(_serve_configs()[1])
    assert config.applications
    # KubeRay's Serve Service forwards to the proxy on each pod: a loopback-only proxy is unreachable there.
    assert config.http_options.host not in ("127.0.0.1", "localhost", "::1"), config.http_options.host
    (head,) = cluster_spec("RayService")["headGroupSpec"]["template"]["spec"]["containers"]
    serve_ports = [p["containerPort"] for p in head["ports"] if p["name"] == "serve"]
    assert serve_ports == [config.http_options.port]
    from serve.app import deployment_options, ingress_options

    for app in config.applications:
        assert app.deployments == []  # their options are all in args.config.serve
        serve_config = _app_config(_serve_configs()[1]).serve
        gpus = (
            deployment_options(serve_config)["ray_actor_options"]["num_gpus"],
            ingress_options(serve_config)["ray_actor_options"]["num_gpus"],
        )
        # the model replicas hold a GPU each; the HTTP ingress needs none
        assert gpus[0] >= 1 and gpus[1] == 0, gpus
