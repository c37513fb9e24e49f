"""`vlm-embed serve` for real: the shipped serve/config.yaml on loopback, the API key, Ctrl-C to stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import free_port

pytestmark = pytest.mark.slow
VLM_EMBED = str(Path(sys.executable).with_name("vlm-embed"))
SERVE_CONFIG = Path(__file__).parents[2] / "serve" / "config.yaml"


@dataclass
class Served:
    """A running `vlm-embed serve`: its process, its output lines so far, and its URL."""

    process: subprocess.Popen
    lines: list[str]
    url: str

    def stop_with_ctrl_c(self, timeout_s: float) -> None:
        self.process.send_signal(signal.SIGINT)
        assert self.process.wait(timeout=timeout_s) == 0, "".join(self.lines)


@contextmanager
def serving(port: int, args: list[str], env: dict[str, str], cwd: Path, timeout_s: float = 240):
    """`vlm-embed serve ARGS` in its own session, once it prints that it serves on 127.0.0.1:`port`; killed
    afterwards if it is still running."""
    process = subprocess.Popen(
        [VLM_EMBED, "serve", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        while not any(f"at {url}" in line for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        yield Served(process, lines, url)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def listening_addresses(port: int) -> set[str]:
    import psutil

    return {
        c.laddr.ip
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


def test_help_explains_the_serve_command():
    result = subprocess.run([VLM_EMBED, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "127.0.0.1:8000" in result.stdout and "--api-key-env" in result.stdout


def test_a_wrong_model_path_is_refused_before_starting_anything(tmp_path):
    result = subprocess.run(
        [VLM_EMBED, "serve", "--model", str(tmp_path / "no-model-here")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "not a checkpoint directory" in result.stderr


def test_serve_runs_the_shipped_config_on_loopback_with_the_key_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    env = {**os.environ, "VLM_EMBED_API_KEY": "cli-key"}
    args = ["--config", str(SERVE_CONFIG), "--port", str(port), "--max-replicas", "1"]
    with serving(port, args, env, tmp_path) as served:
        url = served.url
        assert listening_addresses(port) == {"127.0.0.1"}
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "hi"}, timeout=30).status_code == 401
        response = httpx.post(
            f"{url}/v1/embeddings",
            json={"input": ["hi", "there"]},
            headers={"Authorization": "Bearer cli-key"},
            timeout=30,
        )
        assert response.status_code == 200 and len(response.json()["data"]) == 2
        served.stop_with_ctrl_c(timeout_s=90)
        time.sleep(1)
        assert not listening_addresses(port)
