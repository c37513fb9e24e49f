"""Our own metrics, exported through `ray.util.metrics` to Ray's Prometheus endpoint and dashboard.

Metric objects are created lazily, in the process that records them (an actor, a Ray Data task, a Serve
replica), so importing this module is free and nothing is registered until something is measured. Names
start with `vlm_embed_`; Ray adds its `ray_` prefix on export.
"""

from __future__ import annotations

import functools

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]


@functools.cache
def _counter(name: str, description: str, tag_keys: tuple[str, ...] = ()):
    from ray.util.metrics import Counter

    return Counter(name, description=description, tag_keys=tag_keys)


@functools.cache
def _histogram(name: str, description: str, boundaries: tuple[float, ...], tag_keys: tuple[str, ...] = ()):
    from ray.util.metrics import Histogram

    return Histogram(name, description=description, boundaries=list(boundaries), tag_keys=tag_keys)


@functools.cache
def _gauge(name: str, description: str, tag_keys: tuple[str, ...] = ()):
    from ray.util.metrics import Gauge

    return Gauge(name, description=description, tag_keys=tag_keys)


class PipelineMetrics:
    """What a backfill records: items, tokens and images embedded, errors by stage, batch latency and size."""

    def items_embedded(self, modality: str, count: int = 1) -> None:
        if count:
            _counter("vlm_embed_items_embedded", "Items embedded, by modality.", ("modality",)).inc(
                count, tags={"modality": modality}
            )

    def tokens(self, count: int) -> None:
        if count:
            _counter("vlm_embed_tokens_embedded", "Tokens run through the model (real, not padding).").inc(
                count
            )

    def images(self, count: int) -> None:
        if count:
            _counter("vlm_embed_images_embedded", "Images run through the vision tower.").inc(count)

    def errors(self, stage: str, count: int = 1) -> None:
        if count:
            _counter("vlm_embed_errors", "Rows that failed, by pipeline stage.", ("stage",)).inc(
                count, tags={"stage": stage}
            )

    def batch(self, latency_s: float, size: int) -> None:
        _histogram(
            "vlm_embed_batch_latency_seconds", "Time of one embedding batch.", tuple(LATENCY_BOUNDARIES_S)
        ).observe(latency_s)
        _histogram("vlm_embed_batch_size", "Items in one embedding batch.", tuple(SIZE_BOUNDARIES)).observe(
            size
        )


class ServeMetrics:
    """What the Serve app records: requests by endpoint and status, latency, server batch size, queue depth."""

    def request(self, endpoint: str, status: int, latency_s: float) -> None:
        tags = {"endpoint": endpoint, "status": str(status)}
        _counter(
            "vlm_embed_serve_requests", "HTTP requests, by endpoint and status.", ("endpoint", "status")
        ).inc(1, tags=tags)
        _histogram(
            "vlm_embed_serve_request_latency_seconds",
            "Request latency, by endpoint.",
            tuple(LATENCY_BOUNDARIES_S),
            ("endpoint",),
        ).observe(latency_s, tags={"endpoint": endpoint})

    def batch(self, size: int, latency_s: float) -> None:
        _histogram(
            "vlm_embed_serve_batch_size", "Items in one server-side batch.", tuple(SIZE_BOUNDARIES)
        ).observe(size)
        _histogram(
            "vlm_embed_serve_batch_latency_seconds",
            "Time of one server-side batch.",
            tuple(LATENCY_BOUNDARIES_S),
        ).observe(latency_s)

    def queue_depth(self, depth: int) -> None:
        _gauge("vlm_embed_serve_queue_depth", "Requests waiting for or inside a batch on this replica.").set(
            depth
        )
