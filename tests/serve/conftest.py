"""Ray Serve started for real on 127.0.0.1 (a free port) once for the serve tests, and apps deployed on it."""

from __future__ import annotations

import base64
import socket
import time

import pytest

from pipelines.config import Config, EmbedderConfig, ServeConfig, TableConfig
from tests.conftest import image_bytes

API_KEY = "test-key-0123"
API_KEY_ENV = "VLM_EMBED_TEST_API_KEY"
# Small limits so that every refusal is cheap to provoke.
LIMITS = dict(max_body_bytes=256 * 1024, max_items_per_request=16, max_text_chars=2000)
MAX_IMAGE_PIXELS = 160 * 160


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeHttp:
    """The running Serve instance: its base URL and a way to deploy apps under route prefixes."""

    def __init__(self, port: int):
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    def deploy(self, name: str, config: Config, route_prefix: str, **options) -> str:
        """Deploy `config` as app `name` at `route_prefix`; return its URL once /healthz answers 200."""
        from ray import serve

        from serve.app import app_for

        serve.run(app_for(config, **options), name=name, route_prefix=route_prefix, blocking=False)
        url = self.base + route_prefix.rstrip("/")
        wait_healthy(url)
        return url

    def deployed(self, name: str, config: Config, route_prefix: str, **options):
        """`deploy` as a context manager: the app is deleted when the block ends, so that its replicas'
        CPUs go back to the test cluster (4 CPUs: later tests' replicas need them)."""
        import contextlib

        from ray import serve

        @contextlib.contextmanager
        def running():
            try:
                yield self.deploy(name, config, route_prefix, **options)
            finally:
                serve.delete(name)

        return running()


def wait_healthy(url: str, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/healthz", timeout=5)
            if response.status_code == 200:
                return
            last = response.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s} s (last: {last})")


@pytest.fixture(scope="package")
def serve_http(ray_session):
    """Serve's HTTP proxy on 127.0.0.1 at a free port, shut down after the serve tests."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    yield ServeHttp(port)
    serve.shutdown()


def app_config(tiny_model_dir, table_uri: str, **serve_options) -> Config:
    return Config(
        embedder=EmbedderConfig(
            model=str(tiny_model_dir), device="cpu", dtype="float32", max_image_pixels=MAX_IMAGE_PIXELS
        ),
        table=TableConfig(uri=table_uri),
        serve=ServeConfig(
            **{
                **LIMITS,
                "num_cpus": 0.25,
                "ingress_num_cpus": 0.25,
                "api_key_env": API_KEY_ENV,
                **serve_options,
            }
        ),
    )


def with_api_key() -> dict:
    """Replica options that put the API key into the replicas' environment."""
    return {
        "ingress": {
            "ray_actor_options": {"num_cpus": 0.25, "runtime_env": {"env_vars": {API_KEY_ENV: API_KEY}}}
        }
    }


@pytest.fixture(scope="package")
def table_uri(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("serve-db") / "lancedb")


@pytest.fixture(scope="package")
def main_app(serve_http, tiny_model_dir, table_uri) -> str:
    """The app most tests talk to: the tiny model, small limits, an API key, one replica, at `/`."""
    return serve_http.deploy("main", app_config(tiny_model_dir, table_uri), "/", **with_api_key())


@pytest.fixture
def client(main_app):
    import httpx

    with httpx.Client(
        base_url=main_app, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    ) as client:
        yield client


def b64_image(seed: int = 0, size=(96, 64), fmt: str = "PNG") -> str:
    return base64.b64encode(image_bytes(seed, size, fmt)).decode()
