"""`vlm-embed serve`: read a config file, start Ray Serve on 127.0.0.1:8000 (by default), serve until Ctrl-C.

The file is either the project's `Config` YAML (the same file that drives a backfill) or a Ray Serve config
file such as serve/config.yaml, whose application `serve.app:build_app` carries the `Config` in its `args` and
whose `deployments:` entries hold Serve options (`EmbeddingModel`: replicas, GPUs, batching; `EmbeddingService`:
the HTTP ingress). Flags given on the command line win over both; they set the model deployment's options.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import Config

BUILDER = "serve.app:build_app"
MODEL_DEPLOYMENT = "EmbeddingModel"  # serve.app's names, without importing Ray here
INGRESS_DEPLOYMENT = "EmbeddingService"
RERANK_DEPLOYMENT = "RerankModel"
# ServeConfig fields whose flag replaces what a Serve config file's deployment entry says
_FLAG_OPTIONS = {
    "num_gpus": ("ray_actor_options", "num_gpus"),
    "num_cpus": ("ray_actor_options", "num_cpus"),
    "max_ongoing_requests": ("max_ongoing_requests",),
    "max_queued_requests": ("max_queued_requests",),
}
# ... and those whose flag replaces what it says for the ingress
_INGRESS_FLAG_OPTIONS = {
    "max_ongoing_requests": ("max_ongoing_requests",),  # the ingress holds what every model replica can take
    "max_replicas": ("max_ongoing_requests",),
    "max_queued_requests": ("max_queued_requests",),
    "retry_after_s": ("backpressure_config", "retry_after_s"),
    "ingress_replicas": ("num_replicas",),
    "ingress_num_cpus": ("ray_actor_options", "num_cpus"),
}
_REPLICA_FIELDS = ("min_replicas", "max_replicas", "target_ongoing_requests")


class LaunchError(ValueError):
    """A config file that cannot be served, with what to change."""


@dataclass
class Target:
    """What to serve: the `Config`, Serve options of the deployments from a Serve config file (`deployment`
    for `EmbeddingModel`, `ingress` for `EmbeddingService`, `reranker` for `RerankModel`), and HTTP options."""

    config: Config
    deployment: dict[str, Any] = field(default_factory=dict)
    http_options: dict[str, Any] = field(default_factory=dict)
    ingress: dict[str, Any] = field(default_factory=dict)
    reranker: dict[str, Any] = field(default_factory=dict)


def load_target(path: Path | None) -> Target:
    """A `Config` YAML or a Serve config file (recognised by its `applications:` key); no file: defaults."""
    if path is None:
        return Target(Config())
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise LaunchError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise LaunchError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise LaunchError(f"{path}: expected a mapping at the top level")
    if "applications" not in data:
        return Target(Config.model_validate(data))
    return _from_serve_file(path, data)


def _from_serve_file(path: Path, data: dict[str, Any]) -> Target:
    from serve.app import config_from_args

    ours = [app for app in data.get("applications") or [] if app.get("import_path") == BUILDER]
    if len(ours) != 1:
        raise LaunchError(f"{path}: expected one application with import_path {BUILDER}, found {len(ours)}")
    app = ours[0]
    config = config_from_args(app.get("args"))
    entries = {d.get("name"): d for d in app.get("deployments") or []}
    known = {MODEL_DEPLOYMENT, INGRESS_DEPLOYMENT, RERANK_DEPLOYMENT}
    unknown = sorted(set(entries) - known, key=str)
    if unknown:
        raise LaunchError(
            f"{path}: unknown deployments {unknown}; this app has {MODEL_DEPLOYMENT}, {INGRESS_DEPLOYMENT} "
            f"and (with a reranker: section) {RERANK_DEPLOYMENT}"
        )

    def options(name: str) -> dict[str, Any]:
        return {k: v for k, v in entries.get(name, {}).items() if k != "name"}

    http_options = dict(data.get("http_options") or {})
    return Target(
        config,
        options(MODEL_DEPLOYMENT),
        http_options,
        options(INGRESS_DEPLOYMENT),
        options(RERANK_DEPLOYMENT),
    )


def apply_flags(target: Target, embedder: dict[str, Any], serve: dict[str, Any]) -> Target:
    """Flags given on the command line (`EmbedderConfig` and `ServeConfig` fields) over the file's values."""
    config = target.config
    config = config.model_copy(
        update={
            "embedder": type(config.embedder).model_validate({**config.embedder.model_dump(), **embedder}),
            "serve": type(config.serve).model_validate(
                {**config.serve.model_dump(), **_http_defaults(target.http_options, serve), **serve}
            ),
        }
    )
    deployment = _copy(target.deployment)
    given_options = [name for name in serve if name in _FLAG_OPTIONS]
    if given_options or any(name in serve for name in _REPLICA_FIELDS):
        from serve.app import deployment_options

        derived = deployment_options(config.serve)
        _override(deployment, [_FLAG_OPTIONS[name] for name in given_options], derived)
        if any(name in serve for name in _REPLICA_FIELDS):
            for key in ("num_replicas", "autoscaling_config"):
                deployment.pop(key, None)
                if key in derived:
                    deployment[key] = derived[key]
    ingress = _copy(target.ingress)
    given_ingress = [name for name in serve if name in _INGRESS_FLAG_OPTIONS]
    if given_ingress:
        from serve.app import ingress_options

        _override(
            ingress, [_INGRESS_FLAG_OPTIONS[name] for name in given_ingress], ingress_options(config.serve)
        )
    return Target(config, deployment, target.http_options, ingress, target.reranker)


def with_reranker(target: Target, model: str | None) -> Target:
    """The target with a reranker of `model` (`--reranker`), replacing the file's reranker model if any."""
    if model is None:
        return target
    from pipelines.config import RerankerConfig

    current = target.config.reranker.model_dump() if target.config.reranker is not None else {}
    reranker = RerankerConfig.model_validate({**current, "model": model})
    return replace(target, config=target.config.model_copy(update={"reranker": reranker}))


def _copy(options: dict[str, Any]) -> dict[str, Any]:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in options.items()}


def _override(options: dict[str, Any], paths: list[tuple[str, ...]], derived: dict[str, Any]) -> None:
    """Set each of `paths` in `options` to its value in `derived` (what the flags' config gives)."""
    for path in paths:
        _set(options, path, _get(derived, path))


def _http_defaults(http_options: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    return {key: http_options[key] for key in ("host", "port") if key in http_options and key not in given}


def _get(options: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        options = options[key]
    return options


def _set(options: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        options = options.setdefault(key, {})
    options[path[-1]] = value


def ray_address(config: Config, address: str | None) -> str | None:
    """`--address`, else the config's, else RAY_ADDRESS's cluster, else a new local Ray."""
    return address or config.resources.ray_address or (None if os.environ.get("RAY_ADDRESS") else "local")


def serve_forever(target: Target, address: str | None) -> int:
    """Start (or join) Ray, start Serve's HTTP proxy, deploy the app and wait for Ctrl-C; 1 if it fails."""
    import ray
    from ray import serve

    from serve.app import APP_NAME, app_for
    from serve.high_throughput import cluster_has_it, enable_for_local_ray, missing_on_cluster_message

    print_fn = functools.partial(print, flush=True)
    config = target.config
    address = ray_address(config, address)
    if config.serve.high_throughput and address == "local":
        for line in enable_for_local_ray():
            print_fn(line)
    ray.init(address=address, include_dashboard=False if address == "local" else None)
    if config.serve.high_throughput and address != "local" and not cluster_has_it():
        print_fn(f"error: {missing_on_cluster_message()}")
        ray.shutdown()
        return 1
    timeout = target.http_options.get("request_timeout_s", 2 * config.serve.request_timeout_s)
    serve.start(
        http_options={"host": config.serve.host, "port": config.serve.port, "request_timeout_s": timeout}
    )
    try:
        app = app_for(config, target.ingress, reranker_options=target.reranker, **target.deployment)
        serve.run(app, name=APP_NAME, route_prefix="/")
        url = f"http://{config.serve.host}:{config.serve.port}"
        rerank = f"POST /rerank ({config.reranker.model}), " if config.reranker is not None else ""
        print_fn(
            f"serving {config.serve.served_model_name or config.embedder.model} at {url}: POST /v1/embeddings, "
            f"POST /search, {rerank}GET /healthz, GET /v1/models (Ctrl-C to stop)"
        )
        while True:
            status = serve.status().applications.get(APP_NAME)
            if status is None or status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                print_fn(
                    f"error: the app is {status.status if status else 'gone'}: {status.message if status else ''}"
                )
                return 1
            time.sleep(2)
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:  # serve.run raises when the deployment fails (e.g. the model cannot load)
        print_fn(f"error: {exc}")
        return 1
    finally:
        if address == "local":
            ray.shutdown()  # the whole local instance goes, replicas included: no graceful drain to wait for
        else:
            serve.delete(APP_NAME)
