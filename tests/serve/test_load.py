"""Load over real HTTP: a thousand requests without a 5xx, and overload answered at once with 503 + Retry-After."""

from __future__ import annotations

import asyncio
import time

import pytest

from benchmarks.load_test import HEADER, ServeCpu, drive, format_row, make_bodies
from tests.serve.conftest import API_KEY, app_config

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_a_thousand_requests_at_concurrency_32_get_no_5xx(main_app):
    bodies = make_bodies(count=64, items_per_request=1, words=12)
    cpu = ServeCpu(app="main")
    before = cpu.sample()
    result = asyncio.run(
        drive(f"{main_app}/v1/embeddings", bodies, concurrency=32, requests=1000, headers=AUTH)
    )
    summary = result.summary()
    per_request = cpu.per_request(before, cpu.sample(), result.requests)
    print(f"\n{HEADER}\n{format_row(summary)}\ncpu ms/request: {ServeCpu.describe(per_request)}")
    assert result.requests == 1000
    assert result.ok == 1000, f"not all requests succeeded: {dict(result.statuses)} {dict(result.messages)}"
    assert summary["p50_ms"] <= summary["p99_ms"] < 60_000
    # every request went from this client through the proxy, an ingress replica and the model replica, each
    # using CPU for it (no HAProxy: the test cluster runs Serve's own proxy)
    seen = {role: v for role, v in per_request.items() if v["processes"]}
    assert {role: v["processes"] for role, v in seen.items()} == {
        "proxy": 1,
        "ingress": 1,
        "model": 1,
        "client": 1,
    }
    assert all(v["ms"] > 0.1 for v in seen.values()), per_request


@pytest.fixture(scope="module")
def overloaded_app(serve_http, tiny_model_dir, table_uri):
    """One request in flight and one queued at most; the replica gives up on a request after 0.5 s, and a
    batch waits 1 s to fill, so at least the first request it takes runs out of time: overload in both places."""
    from ray import serve

    config = app_config(
        tiny_model_dir,
        table_uri,
        max_ongoing_requests=1,
        max_queued_requests=1,
        request_timeout_s=0.5,
        batch_wait_timeout_s=1.0,
        retry_after_s=3,
        api_key_env="VLM_EMBED_UNSET_KEY_VARIABLE",
    )
    yield serve_http.deploy("overloaded", config, "/overloaded")
    serve.delete("overloaded")


def test_overload_is_answered_with_503_and_retry_after_never_a_hang(overloaded_app):
    bodies = make_bodies(count=8)
    began = time.perf_counter()
    result = asyncio.run(
        drive(f"{overloaded_app}/v1/embeddings", bodies, concurrency=32, requests=200, timeout_s=30)
    )
    elapsed = time.perf_counter() - began
    print(f"\n{HEADER}\n{format_row(result.summary())}\n{dict(result.messages)}")
    assert result.requests == 200 and set(result.statuses) <= {200, 503}, dict(result.statuses)
    assert result.statuses[503] > 100
    assert result.retry_after == {"3": result.statuses[503]}  # every 503 says when to come back
    messages = " ".join(result.messages)
    assert "backpressure" in messages  # refused by Serve's queue limit before reaching the replica
    assert "not answered within 0.5 s" in messages  # taken by the replica, given up on in bounded time
    assert elapsed < 60
