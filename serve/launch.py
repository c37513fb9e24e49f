"""`vlm-embed serve`: read a config file, start Ray Serve on 127.0.0.1:8000 (by default), serve until Ctrl-C.

The file is either the project's `Config` YAML (the same file that drives a backfill) or a Ray Serve config
file such as serve/config.yaml, whose application `serve.app:build_app` carries the `Config` in its `args`.
Every option of the deployments (replicas, GPUs, queues, autoscaling) is a field of the config's `serve`
section (`ServeConfig`, their one owner); flags given on the command line win over the file's values. A Serve
file's `deployments:` entries would be a second owner, so they are refused with where each option lives.
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import Config
from pipelines.ray_cluster import ray_address

BUILDER = "serve.app:build_app"


class LaunchError(ValueError):
    """A config file that cannot be served, with what to change."""


@dataclass
class Target:
    """What to serve: the `Config`, and the HTTP options of a Serve config file (the proxy's own)."""

    config: Config
    http_options: dict[str, Any] = field(default_factory=dict)


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
    if app.get("deployments"):
        names = sorted(str(d.get("name")) for d in app["deployments"])
        raise LaunchError(
            f"{path}: the application has deployments: entries ({', '.join(names)}); vlm-embed takes every "
            "deployment option from args.config.serve (replicas: min_replicas, max_replicas, "
            "target_ongoing_requests, upscale_delay_s, downscale_delay_s; resources: num_gpus, num_cpus, "
            "ingress_replicas, ingress_num_cpus, reranker_replicas, reranker_num_gpus; queues: "
            "max_ongoing_requests, max_queued_requests, retry_after_s): move them there"
        )
    return Target(config_from_args(app.get("args")), dict(data.get("http_options") or {}))


def apply_flags(target: Target, args: argparse.Namespace) -> Target:
    """Flags given on the command line (`EmbedderConfig` and `ServeConfig` fields) over the file's values; a
    Serve file's `http_options` host and port count as the file's."""
    from pipelines.config import EmbedderConfig, ServeConfig
    from pipelines.config_flags import with_flags

    listen = {k: target.http_options[k] for k in ("host", "port") if k in target.http_options}
    config = target.config.model_copy(update={"serve": target.config.serve.model_copy(update=listen)})
    return replace(
        target, config=with_flags(config, args, {"embedder": EmbedderConfig, "serve": ServeConfig})
    )


def with_reranker(target: Target, model: str | None) -> Target:
    """The target with a reranker of `model` (`--reranker`), replacing the file's reranker model if any."""
    if model is None:
        return target
    from pipelines.config import RerankerConfig

    current = target.config.reranker.model_dump() if target.config.reranker is not None else {}
    reranker = RerankerConfig.model_validate({**current, "model": model})
    return replace(target, config=target.config.model_copy(update={"reranker": reranker}))


def serve_forever(target: Target, address: str | None) -> int:
    """Start (or join) Ray, start Serve's HTTP proxy, deploy the app and wait for Ctrl-C; 1 if it fails."""
    import ray
    from ray import serve

    from serve.app import APP_NAME, app_for
    from serve.high_throughput import cluster_has_it, enable_for_local_ray, missing_on_cluster_message

    print_fn = functools.partial(print, flush=True)
    config = target.config
    address = ray_address(config.resources.ray_address, address)
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
        app = app_for(config)
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
