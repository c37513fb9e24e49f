"""Replicas over real HTTP: autoscaling up under load, a killed replica replaced, and back down after the load."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from benchmarks.load_test import HEADER, drive, format_row, make_bodies
from serve.app import MODEL_DEPLOYMENT
from tests.serve.conftest import app_config

pytestmark = pytest.mark.slow
NO_KEY = {"api_key_env": "VLM_EMBED_UNSET_KEY_VARIABLE"}


def running_replicas(app: str) -> int:
    from ray import serve

    application = serve.status().applications.get(app)
    if application is None or MODEL_DEPLOYMENT not in application.deployments:
        return 0
    return application.deployments[MODEL_DEPLOYMENT].replica_states.get("RUNNING", 0)


def replica_actor_names(app: str) -> set[str]:
    import ray

    return {
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{app}#{MODEL_DEPLOYMENT}#")
    }


def serve_state(app: str) -> str:
    """What Serve says about the app's model deployment, and the replica actors alive: for a timeout's message."""
    from ray import serve

    application = serve.status().applications.get(app)
    deployment = application.deployments.get(MODEL_DEPLOYMENT) if application else None
    if deployment is None:
        return f"no {MODEL_DEPLOYMENT} deployment in app {app!r}"
    return (
        f"{deployment.status} ({deployment.status_trigger}): {deployment.message!r}; "
        f"replica states {dict(deployment.replica_states)}; actors {sorted(replica_actor_names(app))}"
    )


def wait_for(condition, timeout_s: float, what: str, app: str = "scaled") -> float:
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout_s:
            raise TimeoutError(f"{what} did not happen within {timeout_s} s; Serve: {serve_state(app)}")
        time.sleep(0.25)
    return time.monotonic() - began


class BackgroundLoad:
    """`drive` on its own thread until stopped; the result is there after `stop()`."""

    def __init__(self, url: str, concurrency: int):
        self.stop_event = threading.Event()
        self.result = None
        self._thread = threading.Thread(
            target=self._run, args=(url, concurrency), name="background-load", daemon=True
        )

    def _run(self, url: str, concurrency: int) -> None:
        bodies = make_bodies(count=32, words=12)
        self.result = asyncio.run(
            drive(f"{url}/v1/embeddings", bodies, concurrency=concurrency, stop=self.stop_event, timeout_s=60)
        )

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def stop(self):
        self.stop_event.set()
        self._thread.join(timeout=90)
        assert not self._thread.is_alive(), "the load did not stop: a request hangs"
        print(f"\n{HEADER}\n{format_row(self.result.summary())}\n{dict(self.result.messages)}")
        return self.result

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive():
            self.stop()


def test_under_load_replicas_scale_up_a_killed_one_is_replaced_and_they_scale_back_down_after(
    serve_http, tiny_model_dir, table_uri
):
    """One app, one sustained load: the replica count rises above min_replicas; a replica killed under that load
    is replaced while clients see at most a few failed requests, counted here; after the load it scales down."""
    import httpx
    import ray
    from ray import serve

    # a health check every second: a killed replica is found (and replaced) within a second, not Serve's 10 s
    config = app_config(
        tiny_model_dir, table_uri, min_replicas=1, max_replicas=2, health_check_period_s=1.0, **NO_KEY
    )
    url = serve_http.deploy(
        "scaled",
        config,
        "/scaled",
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": 2,
            # items per replica: one ingress sends a load of 16 in 2-3 calls, so only a policy counting items
            # (serve/autoscaling.py) wants a second replica
            "target_ongoing_requests": 4,
            "metrics_interval_s": 0.25,
            "look_back_period_s": 2.0,
            "upscale_delay_s": 0.5,
            "downscale_delay_s": 3.0,
        },
    )
    try:
        assert running_replicas("scaled") == 1
        with BackgroundLoad(url, concurrency=16) as load:
            up = wait_for(lambda: running_replicas("scaled") == 2, 120, "scaling up to 2 replicas")
            before = replica_actor_names("scaled")
            assert len(before) == 2
            time.sleep(1.0)  # both replicas serve for a moment
            victim = sorted(before)[0]
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            replaced = wait_for(
                # a new replica running in the killed one's place (and maybe the survivor's: the autoscaler may retire
                # it while the count is down); the victim's name alone vanishes at once, before Serve notices
                lambda: running_replicas("scaled") == 2 and bool(replica_actor_names("scaled") - before),
                120,
                "a new replica replacing the killed one",
            )
            time.sleep(1.0)
            result = load.stop()
        down = wait_for(lambda: running_replicas("scaled") == 1, 90, "scaling back down to 1 replica")
        failed = result.requests - result.ok
        print(
            f"scaled up after {up:.1f} s of load; killed replica replaced in {replaced:.1f} s; back down "
            f"{down:.1f} s after the load; failed requests: {failed} of {result.requests}"
        )
        assert victim not in replica_actor_names("scaled")
        assert result.ok > 0
        assert set(result.statuses) <= {200, 500, 502, 503, "ServerDisconnectedError", "ClientOSError"}
        assert failed <= 2 * 16, (
            f"more than the requests in flight at the kill failed: {dict(result.statuses)}"
        )
        with httpx.Client(timeout=30) as client:  # and after it all, every request works again
            statuses = [
                client.post(f"{url}/v1/embeddings", json={"input": f"after {i}"}).status_code
                for i in range(20)
            ]
        assert statuses == [200] * 20
    finally:
        serve.delete("scaled")
