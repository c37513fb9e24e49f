"""The Ray Serve app: the same `pipelines.embedder.Embedder` the backfill uses, behind an HTTP API.

Two deployments. `EmbeddingService` is the HTTP ingress (CPU replicas): the routes of `serve.routes`, input
checks, preparing items (decode, tokenize) on a thread pool, and responses. `EmbeddingModel` holds the
embedder (a GPU per replica where the cluster has GPUs): it loads it once, runs one warm-up batch, and then
puts the items of concurrent requests into one forward pass through its `@serve.batch` queue, up to a
padded-token budget, the forward pass on its own thread. Keeping HTTP and tokenizing out of the model's
process matters on a GPU: a forward pass takes milliseconds there, and per-request Python work in the same
process (one interpreter lock) would otherwise cap the requests per second and keep batches small.

Build the app with `build_app(args)` (import path `serve.app:build_app`, as in serve/config.yaml) or
`app_for(config)`; both take the one `pipelines.config.Config`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve as ray_serve

from pipelines.config import Config, EmbedderConfig, ServeConfig
from pipelines.items import ItemError
from pipelines.metrics import ServeMetrics
from serve.auth import api_key_from_env
from serve.autoscaling import PENDING_ITEMS
from serve.autoscaling import POLICY as AUTOSCALING_POLICY
from serve.coalesce import Coalescer
from serve.errors import ApiError, overloaded
from serve.inputs import InputLimits, join_field
from serve.search import SearchTable

APP_NAME = "vlm-embed"
INGRESS_DEPLOYMENT = "EmbeddingService"  # HTTP: checks, preparing, responses (CPU replicas)
MODEL_DEPLOYMENT = "EmbeddingModel"  # the embedder and its batch queue (GPU replicas, where there are GPUs)
PREPARE_THREADS = 4
# An ingress replica keeps this many calls to the model deployment in flight; the requests that arrive meanwhile
# go together in its next call, or in one of their own once this many items wait (`serve.coalesce`)
MODEL_CALLS_PER_INGRESS = 2
MODEL_CALL_GROUP_ITEMS = 8
HEALTH_TIMEOUT_S = 5.0
_IMAGE_ERRORS = {"image_decode", "image_unreadable", "image_too_large"}


@dataclass
class _Pending:
    """One prepared item waiting for a server batch; `cost` is its token count, capped at the budget."""

    prepared: Any
    cost: int


def padded_tokens(batch: list[_Pending]) -> int:
    """The `batch_size_fn`: what a batch costs once padded, items x the longest item's tokens."""
    return len(batch) * max(p.cost for p in batch)


@dataclass
class BatchStats:
    """Counts of this replica's server batches (reported by /healthz; the metrics go to Prometheus)."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    calls: int = 0  # calls from the ingress replicas (each carries one or more requests' items)

    def record(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.largest = max(self.largest, size)

    def as_dict(self) -> dict[str, int]:
        return {
            "batches": self.batches,
            "batched_items": self.items,
            "largest_batch": self.largest,
            "model_calls": self.calls,
        }


class _TokenBudgetWarningFilter(logging.Filter):
    """Serve warns when max_batch_size exceeds max_ongoing_requests, counting requests; ours counts tokens."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_batch_size" not in record.getMessage()


def serving_embedder_config(config: Config) -> EmbedderConfig:
    """The embedder options both deployments use: the config's, with the server's image-size bound."""
    return config.embedder.model_copy(
        update={"max_image_pixels": min(config.embedder.max_image_pixels, config.serve.max_image_pixels)}
    )


@ray_serve.deployment(name=MODEL_DEPLOYMENT)
class EmbeddingModel:
    """One model replica (a GPU, where there is one): the embedder and its `@serve.batch` queue. It only
    embeds prepared items; HTTP, checks, tokenizing and responses stay on the ingress replicas, so this
    process's one Python thread of control goes to forming batches and launching the forward pass."""

    def __init__(self, config: dict[str, Any]):
        from pipelines.embedder import Embedder

        self.config = Config.model_validate(config)
        embedder_config = serving_embedder_config(self.config)
        self.embedder = Embedder.from_config(embedder_config)
        self.metrics = ServeMetrics()
        self.stats = BatchStats()
        self.pending_items = 0
        self._budget = max(embedder_config.max_batch_tokens, embedder_config.max_length)
        self._forward_pool = ThreadPoolExecutor(1, thread_name_prefix="forward")
        logging.getLogger("ray.serve").addFilter(_TokenBudgetWarningFilter())
        self._embed_item.set_max_batch_size(self._budget)
        self._embed_item.set_batch_wait_timeout_s(self.config.serve.batch_wait_timeout_s)
        self._warm_up()
        self.ready = True

    async def embed(self, prepared: list[Any]) -> np.ndarray:
        """Vectors `[n, D]` for one call's prepared items; they join the items of concurrent calls."""
        self.stats.calls += 1
        self._queue_changed(len(prepared))
        try:
            rows = await asyncio.gather(
                *(self._embed_item(_Pending(p, min(p.num_tokens, self._budget))) for p in prepared)
            )
        finally:
            self._queue_changed(-len(prepared))
        return np.stack(rows)

    @ray_serve.batch(max_batch_size=16384, batch_wait_timeout_s=0.005, batch_size_fn=padded_tokens)
    async def _embed_item(self, batch: list[_Pending]) -> list[np.ndarray]:
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(
            self._forward_pool, self.embedder.embed_prepared, [p.prepared for p in batch]
        )
        self.stats.record(len(batch))
        self.metrics.batch(len(batch), time.perf_counter() - start)
        return list(vectors)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What `serve.autoscaling`'s policy scales on: the items this replica holds (queued or in a batch)."""
        return {PENDING_ITEMS: float(self.pending_items)}

    def _queue_changed(self, delta: int) -> None:
        self.pending_items += delta
        self.metrics.queue_depth(self.pending_items)

    def _warm_up(self) -> None:
        """The embedder's own warm-up (compiles, with `compile=True`), then one text and, with an image
        processor, one image through all three steps: a broken model fails the replica, not a request."""
        from PIL import Image

        has_images = self.embedder.image_processor is not None
        self.warm_up_s = self.embedder.warm_up(image_side=64 if has_images else None)
        items: list[Any] = ["warm up"]
        if has_images:
            items.append({"text": "warm up", "image": Image.new("RGB", (64, 64), (128, 64, 32))})
        vectors = self.embedder.embed_batch(items)
        if not np.isfinite(vectors).all():
            raise RuntimeError("the warm-up batch gave non-finite vectors: the model is broken")

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ready else "loading",
            "dimension": self.embedder.get_embedding_dimension(),
            "device": str(self.embedder.device),
            "replica": ray_serve.get_replica_context().replica_id.unique_id,
            "pending_items": self.pending_items,
            "warm_up_s": round(self.warm_up_s, 3),
            **self.stats.as_dict(),
        }

    def check_health(self) -> None:
        """Serve's periodic replica health check: the model is loaded and its thread can still run."""
        if not self.ready or self._forward_pool._shutdown:
            raise RuntimeError("the embedder is not ready")


@ray_serve.deployment(name=INGRESS_DEPLOYMENT)
@ray_serve.ingress()
class EmbeddingService:
    """One ingress replica (CPU): the routes of `serve.routes`, input checks, preparing (decode, tokenize)
    on a thread pool, and responses; vectors come from the `EmbeddingModel` deployment through `model`."""

    def __init__(self, config: dict[str, Any], model):
        from pipelines.backfill import embedding_dimension
        from pipelines.stages import build_preparer

        self.config = Config.model_validate(config)
        serve_config = self.config.serve
        embedder_config = serving_embedder_config(self.config)
        self.model = model
        self.preparer = build_preparer(embedder_config)
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
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        timeout = self.serve_config.request_timeout_s
        retry_after = self.serve_config.retry_after_s
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                prepared = await loop.run_in_executor(
                    self._prepare_pool, self._prepare_all, items, fields, query
                )
                vectors = await self._together.submit(prepared)
        except TimeoutError:
            raise overloaded(
                f"the request was not answered within {timeout:g} s: the server is overloaded, retry later",
                retry_after,
            ) from None
        except BackPressureError:
            raise overloaded("the model replicas' queues are full: retry later", retry_after) from None
        except RayActorError:
            raise overloaded(
                "a model replica stopped while embedding this request: retry", retry_after
            ) from None
        return vectors, sum(p.num_tokens for p in prepared)

    def _prepare_all(self, items: list[Any], fields: list[str], query: bool = False) -> list[Any]:
        out = []
        for item, name in zip(items, fields, strict=True):
            try:
                out.append(self.preparer.prepare(item, query=query))
            except ItemError as exc:
                key = "image" if exc.kind in _IMAGE_ERRORS else ("text" if isinstance(item, dict) else None)
                raise ApiError(
                    422, f"{name or key}: {exc.reason}", param=join_field(name, key), code=exc.kind
                ) from exc
        return out

    async def health(self) -> dict[str, Any]:
        """The model's health as one of its replicas reports it; "loading" until one answers."""
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                model = await self.model.health.remote()
        except Exception as exc:  # noqa: BLE001 (no replica yet, one dying: all mean "not ready")
            return {"status": "loading", "model": self.model_name, "reason": f"{type(exc).__name__}: {exc}"}
        return {**model, "model": self.model_name, "dimension": self.dimension}


def truncate(vectors: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Keep the first `dimensions` components and re-normalise: what `EmbedderConfig(dimensions=...)` gives."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    out = vectors[:, :dimensions]
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32, copy=False)


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


def resolve_num_gpus(num_gpus: float | None) -> float:
    """GPUs per replica: as configured, else 1 when the connected Ray cluster has a GPU, else 0."""
    if num_gpus is not None:
        return num_gpus
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1:
        return 1
    return 0


def deployment_options(serve_config: ServeConfig) -> dict[str, Any]:
    """`EmbeddingModel`'s Serve options from the config; a Serve config file's `deployments:` entry wins."""
    options: dict[str, Any] = {
        "max_ongoing_requests": serve_config.max_ongoing_requests,
        "max_queued_requests": serve_config.max_queued_requests,
        "ray_actor_options": {
            "num_cpus": serve_config.num_cpus,
            "num_gpus": resolve_num_gpus(serve_config.num_gpus),
        },
    }
    if serve_config.min_replicas == serve_config.max_replicas:
        options["num_replicas"] = serve_config.max_replicas
    else:
        options["autoscaling_config"] = with_policy(
            {
                "min_replicas": serve_config.min_replicas,
                "max_replicas": serve_config.max_replicas,
                "target_ongoing_requests": serve_config.target_ongoing_requests,
            }
        )
    return options


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
    }


def app_for(config: Config, ingress: dict[str, Any] | None = None, **overrides: Any):
    """The bound Serve application for a `Config`: `overrides` are `EmbeddingModel`'s Serve options,
    `ingress` `EmbeddingService`'s."""
    payload = config.model_dump(mode="json")
    if overrides.get("autoscaling_config") is not None:
        overrides["autoscaling_config"] = with_policy(overrides["autoscaling_config"])
    model = EmbeddingModel.options(**{**deployment_options(config.serve), **overrides}).bind(payload)
    return EmbeddingService.options(**{**ingress_options(config.serve), **(ingress or {})}).bind(
        payload, model
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
