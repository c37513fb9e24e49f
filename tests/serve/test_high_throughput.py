"""Ray Serve's high-throughput mode for real: `vlm-embed serve --high-throughput` puts HAProxy on the port, answers
with the embedder's vectors and stops on Ctrl-C; a cluster started without the mode is refused with what to set."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time

import httpx
import numpy as np
import pytest

from serve.high_throughput import ENV, HAPROXY_PORTS, enable_for_local_ray, environment_has_it
from tests.serve.conftest import free_port
from tests.serve.test_launch import VLM_EMBED, serving

pytestmark = pytest.mark.slow


def listeners(port: int) -> dict[int, str]:
    """pid -> process name of what listens on `port`, by the listening address."""
    import psutil

    found = {}
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid is not None:
            found[c.pid] = f"{psutil.Process(c.pid).name()}@{c.laddr.ip}"
    return found


def replica_http_ports() -> set[tuple[str, int]]:
    """(address, port) where the ingress replica listens in Ray's HTTP port range for direct ingress."""
    import psutil

    found = set()
    for process in psutil.process_iter(["cmdline"]):
        if " ".join(process.info["cmdline"] or []).startswith("ray::ServeReplica:vlm-embed:EmbeddingService"):
            for c in process.net_connections("tcp"):
                if c.status == psutil.CONN_LISTEN and 30000 <= c.laddr.port < 31000:
                    found.add((c.laddr.ip, c.laddr.port))
    return found


def haproxy_ports(pid: int) -> set[tuple[str, int]]:
    import psutil

    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }


@pytest.fixture
def local_env(monkeypatch):
    """The mode's variables absent now, and removed again after the test (Ray started later must not see them)."""
    for name in [*ENV, *(variable for _, variable, _ in HAPROXY_PORTS)]:
        monkeypatch.setenv(name, "0")  # recorded, so the teardown removes what the test sets
        monkeypatch.delenv(name)
    return monkeypatch


def hold_port(port: int) -> socket.socket:
    """A listener on `port` on all interfaces; if something listens there already, that serves as well."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(("0.0.0.0", port))
        holder.listen()
    except OSError:
        pass
    return holder


def test_enabling_it_for_a_local_ray_sets_both_switches(local_env):
    assert not environment_has_it()
    enable_for_local_ray()
    assert {name: os.environ[name] for name in ENV} == ENV
    assert environment_has_it()
    assert not environment_has_it({**ENV, "RAY_SERVE_ENABLE_HA_PROXY": "0"})


def test_haproxys_own_ports_move_when_taken_unless_the_variables_name_them(local_env):
    with hold_port(8404):
        moved = enable_for_local_ray()
        stats = int(os.environ["RAY_SERVE_HAPROXY_STATS_PORT"])
        assert stats != 8404 and any(line.startswith("HAProxy's stats port 8404 is in use") for line in moved)
        with socket.socket() as probe:  # the port it moved to is free
            probe.bind(("0.0.0.0", stats))
        local_env.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "8404")  # the operator's choice stays
        assert not any("stats" in line for line in enable_for_local_ray())
        assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "8404"


def test_serve_help_offers_the_mode():
    result = subprocess.run([VLM_EMBED, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert "--high-throughput" in result.stdout and "HAProxy" in result.stdout


def test_a_cluster_started_without_the_mode_is_refused_with_what_to_set(ray_session):
    address = ray_session.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    result = subprocess.run(
        [VLM_EMBED, "serve", "--high-throughput", "--address", address],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in result.stdout
    assert "started without it" in result.stdout


def test_haproxy_serves_the_embedders_vectors_on_loopback_and_stops_on_ctrl_c(tmp_path, tiny_model_dir):
    from pipelines.config import EmbedderConfig
    from pipelines.embedder import Embedder

    port = free_port()
    ours = {*ENV, *(variable for _, variable, _ in HAPROXY_PORTS)}
    env = {k: v for k, v in os.environ.items() if k not in ours and k != "RAY_ADDRESS"}
    args = ["--high-throughput", "--port", str(port), "--model", str(tiny_model_dir), "--device", "cpu"]
    args += ["--dtype", "float32", "--num-cpus", "0.5", "--ingress-num-cpus", "0.5"]
    # HAProxy's stats port taken, as by another instance: the CLI moves it
    with hold_port(8404), serving(port, args, env, tmp_path) as served:
        url, lines = served.url, served.lines
        # HAProxy, not Serve's Python proxy, holds the port, on loopback; the ingress replica serves HTTP on a
        # port of its own, on the same host; HAProxy's stats and metrics ports listen on all interfaces (what
        # the README says of this mode)
        assert set(listeners(port).values()) == {"haproxy@127.0.0.1"}, listeners(port)
        assert replica_http_ports() and {ip for ip, _ in replica_http_ports()} == {"127.0.0.1"}
        (haproxy,) = listeners(port)
        assert any(line.startswith("HAProxy's stats port 8404 is in use here") for line in lines), lines
        own = {default: default for _, _, default in HAPROXY_PORTS}  # or where the CLI says it moved one
        for line in lines:
            match = re.match(r"HAProxy's \w+ port (\d+) is in use here: using (\d+)", line)
            if match:
                own[int(match[1])] = int(match[2])
        assert haproxy_ports(haproxy) == {("127.0.0.1", port)} | {("0.0.0.0", p) for p in own.values()}
        texts = ["a red circle", "two blue squares on a table"]
        response = httpx.post(f"{url}/v1/embeddings", json={"input": texts}, timeout=60)
        assert response.status_code == 200, response.text
        served_vectors = np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)
        config = EmbedderConfig(model=str(tiny_model_dir), device="cpu", dtype="float32")
        expected = Embedder.from_config(config).embed_batch(texts)
        np.testing.assert_allclose(served_vectors, expected, atol=1e-5)
        bad = httpx.post(
            f"{url}/v1/embeddings",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
        served.stop_with_ctrl_c(timeout_s=120)
        time.sleep(1)
        assert not listeners(port)


def test_the_app_builder_refuses_the_mode_on_a_cluster_without_it(ray_session):
    from serve.app import build_app

    with pytest.raises(ValueError, match="started without it"):
        build_app({"config": {"serve": {"high_throughput": True}}})
    assert build_app({"config": {"serve": {"high_throughput": False}}}) is not None
