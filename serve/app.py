"""The Ray Serve app: the same `pipelines.embedder.Embedder` the backfill uses, behind an HTTP API.

`EmbeddingService` is the HTTP ingress (CPU replicas): the routes of `serve.routes`, input checks, preparing
items (decode, tokenize) on a thread pool, and responses. The models live in their own deployments
(`serve.models`): `EmbeddingModel` holds the embedder, and `RerankModel` the reranker when the config has a
`reranker:` section (POST /rerank, /search with rerank); each batches the items of concurrent requests.

Build the app with `build_app(args)` (import path `serve.app:build_app`, as in serve/config.yaml) or
`app_for(config)`; both take the one `pipelines.config.Config`.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve as ray_serve

from pipelines.config import Config, ServeConfig
from pipelines.items import ItemError
from pipelines.metrics import ServeMetrics
from pipelines.ray_cluster import resolve_num_gpus
from serve.auth import api_key_from_env
from serve.autoscaling import POLICY as AUTOSCALING_POLICY
from serve.coalesce import Coalescer
from serve.errors import answered_within, item_error, raise_forward_errors
from serve.inputs import InputLimits
from serve.models import (
    MODEL_DEPLOYMENT,
    RERANK_DEPLOYMENT,
    EmbeddingModel,
    RerankModel,
    check_servable,
)
from serve.search import SearchTable

__all__ = ["APP_NAME", "INGRESS_DEPLOYMENT", "MODEL_DEPLOYMENT", "RERANK_DEPLOYMENT", "app_for", "build_app"]

APP_NAME = "vlm-embed"
INGRESS_DEPLOYMENT = "EmbeddingService"  # HTTP: checks, preparing, responses (CPU replicas)
PREPARE_THREADS = 4
# Text-only requests of up to this many items are tokenized on the replica's event loop: a short text's
# tokenizer call costs less CPU than handing it to the prepare pool and back (benchmarks/NOTES.md, issue 17);
# images (decoding, resizing) and longer requests still go to the pool, so the loop never waits long
INLINE_PREPARE_ITEMS = 4
INLINE_PREPARE_CHARS = 4096
# An ingress replica keeps this many calls to the model deployment in flight; the requests that arrive meanwhile
# go together in its next call, or in one of their own once this many items wait (`serve.coalesce`)
MODEL_CALLS_PER_INGRESS = 2
MODEL_CALL_GROUP_ITEMS = 8
HEALTH_TIMEOUT_S = 5.0
# The model deployments' calls come from the ingress replicas, one per group of requests: a line per call in
# their logs says nothing the HTTP access log does not, and writing it took ~5% of a model replica's Python
# time (py-spy, benchmarks/NOTES.md), time its one thread of control owes the batches
NO_ACCESS_LOG = {"enable_access_log": False}


@ray_serve.deployment(name=INGRESS_DEPLOYMENT)
@ray_serve.ingress()
class EmbeddingService:
    """One ingress replica (CPU): the routes of `serve.routes`, input checks, preparing (decode, tokenize)
    on a thread pool, and responses; vectors come from the `EmbeddingModel` deployment through `model`,
    scores from the `RerankModel` deployment through `reranker` (None: no reranker configured)."""

    def __init__(self, config: dict[str, Any], model, reranker=None):
        from pipelines.backends import embedding_dimension, load_preparer

        self.config = Config.model_validate(config)
        serve_config = self.config.serve
        embedder_config = self.config.embedder
        self.model = model
        self.preparer = load_preparer(embedder_config)
        self.dimension = embedding_dimension(embedder_config)
        self.normalize = embedder_config.normalize
        self.model_name = serve_config.served_model_name or self.config.embedder.model
        self.api_key = api_key_from_env(serve_config.api_key_env)
        self.limits = InputLimits(serve_config.max_items_per_request, serve_config.max_text_chars)
        self.search_table = SearchTable(self.config.table, self.config.embedder, self.dimension)
        self.metrics = ServeMetrics()
        self.created = int(time.time())
        self._prepare_pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="prepare")
        self._together = Coalescer(
            model.embed.remote,
            slots=MODEL_CALLS_PER_INGRESS,
            max_items=serve_config.max_items_per_request,
            group_items=MODEL_CALL_GROUP_ITEMS,
        )
        self.reranker = None
        if reranker is not None:
            from serve.rerank import RerankClient

            self.reranker = RerankClient(self.config.reranker, reranker, serve_config, self._prepare_pool)
        self.chat = None  # POST /v1/chat/completions, with an answer: section (serve.chat)
        if self.config.answer is not None:
            from serve.chat import ChatClient

            self.chat = ChatClient(self.config, embedder_config, self.preparer, model, self._prepare_pool)

    def __serve_build_asgi_app__(self):
        from serve.routes import build_api

        return build_api(self)

    @property
    def serve_config(self) -> ServeConfig:
        return self.config.serve

    async def embed(self, items: list[Any], fields: list[str], query: bool = False) -> tuple[np.ndarray, int]:
        """Vectors `[n, D]` for checked items and their token count (`query`: embedded with the query
        instruction); 422 for a bad item, 503 past the timeout, when the model replicas' queues are full, or
        when a model replica died with the request."""
        loop = asyncio.get_running_loop()
        config = self.serve_config
        async with answered_within(config.request_timeout_s, config.retry_after_s, "embedding"):
            if prepares_inline(items):
                prepared = self._prepare_all(items, fields, query)
            else:
                prepared = await loop.run_in_executor(
                    self._prepare_pool, self._prepare_all, items, fields, query
                )
            rows = await self._together.submit(prepared)
        raise_forward_errors(rows.errors, fields)
        return rows.values, sum(p.num_tokens for p in prepared)

    def _prepare_all(self, items: list[Any], fields: list[str], query: bool = False) -> list[Any]:
        out = []
        for item, name in zip(items, fields, strict=True):
            try:
                out.append(self.preparer.prepare(item, query=query))
            except ItemError as exc:
                raise item_error(exc, name, item) from exc
        return out

    async def health(self) -> dict[str, Any]:
        """The model's health as one of its replicas reports it (and the reranker's, with one); "loading"
        until they answer."""
        model = await _health_of(self.model)
        if model["status"] != "ok":
            return {**model, "model": self.model_name}
        health = {**model, "model": self.model_name, "dimension": self.dimension}
        if self.reranker is not None:
            reranker = await _health_of(self.reranker.handle)
            health["reranker"] = {**reranker, "model": self.reranker.model_name}
            if reranker["status"] != "ok":
                health["status"] = "loading"
        return health


def prepares_inline(items: list[Any]) -> bool:
    """Whether a request is prepared on the event loop: a few short texts, no image."""
    if len(items) > INLINE_PREPARE_ITEMS:
        return False
    chars = 0
    for item in items:
        if isinstance(item, str):
            chars += len(item)
        elif item.get("image") is None:
            chars += len(item.get("text") or "") + len(item.get("instruction") or "")
        else:
            return False
    return chars <= INLINE_PREPARE_CHARS


async def _health_of(handle) -> dict[str, Any]:
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_S):
            return await handle.health.remote()
    except Exception as exc:  # noqa: BLE001 (no replica yet, one dying: all mean "not ready")
        return {"status": "loading", "reason": f"{type(exc).__name__}: {exc}"}


# -- building the app ----------------------------------------------------------------------------------


def config_from_args(args: dict[str, Any] | None) -> Config:
    """The app builder's `args`: `config` (a Config mapping, inline) or `config_path` (a Config YAML file)."""
    args = dict(args or {})
    unknown = sorted(set(args) - {"config", "config_path"})
    if unknown:
        raise ValueError(
            f"unknown app args {unknown}; give 'config' (a mapping) or 'config_path' (a YAML file)"
        )
    if "config" in args and "config_path" in args:
        raise ValueError("give either 'config' or 'config_path' in the app args, not both")
    if "config_path" in args:
        return Config.from_yaml(args["config_path"])
    return Config.model_validate(args.get("config") or {})


def deployment_options(serve_config: ServeConfig) -> dict[str, Any]:
    """`EmbeddingModel`'s Serve options: all of them from the config's `serve` section (their one owner)."""
    options: dict[str, Any] = {
        "max_ongoing_requests": serve_config.max_ongoing_requests,
        "max_queued_requests": serve_config.max_queued_requests,
        "ray_actor_options": {
            "num_cpus": serve_config.num_cpus,
            "num_gpus": resolve_num_gpus(serve_config.num_gpus),
        },
        "health_check_period_s": serve_config.health_check_period_s,
        "graceful_shutdown_timeout_s": serve_config.graceful_shutdown_timeout_s,
        "logging_config": NO_ACCESS_LOG,
    }
    if serve_config.min_replicas == serve_config.max_replicas:
        options["num_replicas"] = serve_config.max_replicas
    else:
        options["autoscaling_config"] = with_policy(
            {
                "min_replicas": serve_config.min_replicas,
                "max_replicas": serve_config.max_replicas,
                "target_ongoing_requests": serve_config.target_ongoing_requests,
                "upscale_delay_s": serve_config.upscale_delay_s,
                "downscale_delay_s": serve_config.downscale_delay_s,
            }
        )
    return options


def rerank_deployment_options(serve_config: ServeConfig) -> dict[str, Any]:
    """`RerankModel`'s Serve options, from the config's `serve` section."""
    return {
        "num_replicas": serve_config.reranker_replicas,
        "max_ongoing_requests": serve_config.max_ongoing_requests,
        "max_queued_requests": serve_config.max_queued_requests,
        "ray_actor_options": {
            "num_cpus": serve_config.num_cpus,
            "num_gpus": resolve_num_gpus(serve_config.reranker_num_gpus),
        },
        "logging_config": NO_ACCESS_LOG,
    }


def with_policy(autoscaling_config: dict[str, Any]) -> dict[str, Any]:
    """An `autoscaling_config` that scales on the items model replicas hold (`serve.autoscaling`), unless it
    names its own policy."""
    return {"policy": {"policy_function": AUTOSCALING_POLICY}, **autoscaling_config}


def ingress_options(serve_config: ServeConfig) -> dict[str, Any]:
    """`EmbeddingService`'s Serve options: enough requests in flight to keep every model replica's batches
    full, and the proxy's queue bound, past which requests get 503 with Retry-After."""
    return {
        "num_replicas": serve_config.ingress_replicas,
        "max_ongoing_requests": serve_config.max_ongoing_requests * serve_config.max_replicas,
        "max_queued_requests": serve_config.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": serve_config.retry_after_s},
        "ray_actor_options": {"num_cpus": serve_config.ingress_num_cpus, "num_gpus": 0},
        # one access-log line per HTTP request: Serve's proxy writes it; HAProxy's log goes to syslog, so in
        # high-throughput mode the ingress replicas write it
        "logging_config": {"enable_access_log": serve_config.high_throughput},
    }


def app_for(
    config: Config,
    ingress: dict[str, Any] | None = None,
    reranker_options: dict[str, Any] | None = None,
    **overrides: Any,
):
    """The bound Serve application for a `Config`; its deployments' options come from `config.serve`.
    Python callers (the tests, the benchmarks) may add Serve options the config does not model (a
    `runtime_env`, autoscaling metric intervals): `overrides` for `EmbeddingModel`, `ingress` for
    `EmbeddingService`, `reranker_options` for `RerankModel`. `vlm-embed serve` passes none."""
    check_servable(config.embedder)
    if config.answer is not None:  # answers need an Instruct checkpoint: refused here, not in a replica
        from pipelines.generation import check_can_generate

        check_can_generate(config.embedder)
    payload = config.model_dump(mode="json")
    if overrides.get("autoscaling_config") is not None:
        overrides["autoscaling_config"] = with_policy(overrides["autoscaling_config"])
    model = EmbeddingModel.options(**{**deployment_options(config.serve), **overrides}).bind(payload)
    reranker = None
    if config.reranker is not None:
        options = {**rerank_deployment_options(config.serve), **(reranker_options or {})}
        reranker = RerankModel.options(**options).bind(payload)
    return EmbeddingService.options(**{**ingress_options(config.serve), **(ingress or {})}).bind(
        payload, model, reranker
    )


def build_app(args: dict[str, Any] | None = None):
    """Serve's app builder (`import_path: serve.app:build_app`): `args` hold `config` or `config_path`. A
    config with `serve.high_throughput` is refused on a cluster whose processes run without the mode."""
    config = config_from_args(args)
    if config.serve.high_throughput:
        from serve.high_throughput import cluster_has_it, missing_on_cluster_message

        if not cluster_has_it():
            raise ValueError(missing_on_cluster_message())
    return app_for(config)
