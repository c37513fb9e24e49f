"""A one-node Ray cluster on 127.0.0.1 that outlives the drivers connected to it, for tests that kill a driver.

    with ray_head(num_cpus=2) as head:
        ResourcesConfig(ray_address=head.address)   # a driver joins it through the backfill config
        subprocess.run([...], env=head.env)         # with the token it needs

`ray start --head --block` runs in its own process group (the GCS, the raylet and every worker are in it), with
its own ports, temp dir and auth token; leaving the block stops that group only (TERM, then KILL), never
`ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

RAY = Path(sys.executable).parent / "ray"


@dataclass
class RayHead:
    address: str
    env: dict[str, str]  # the environment a driver of this cluster runs with (token auth, no RAY_ADDRESS)
    temp_dir: Path


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now (held open together while they are picked)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def _up(log: Path, head: subprocess.Popen, deadline: float) -> bool:
    """`ray start` prints "Ray runtime started." once the node has registered (before it blocks)."""
    while time.monotonic() < deadline and head.poll() is None:
        if "Ray runtime started" in log.read_text(errors="replace"):
            return True
        time.sleep(0.5)
    return False


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, startup_s: float = 300) -> Iterator[RayHead]:
    temp_dir = Path(f"/tmp/rh{os.getpid()}")  # short: Ray's socket paths have a length limit
    temp_dir.mkdir(exist_ok=True)
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    gcs, client, dashboard, node, objects, listen, grpc, runtime, metrics = free_ports(9)
    address = f"127.0.0.1:{gcs}"
    command = [str(RAY), "start", "--head", "--block", "--disable-usage-stats", "--include-dashboard=false"]
    command += ["--node-ip-address=127.0.0.1", f"--port={gcs}", f"--num-cpus={num_cpus}"]
    command += [
        f"--ray-client-server-port={client}",
        f"--dashboard-port={dashboard}",
        f"--node-manager-port={node}",
    ]
    command += [f"--object-manager-port={objects}", f"--dashboard-agent-listen-port={listen}"]
    command += [f"--dashboard-agent-grpc-port={grpc}", f"--runtime-env-agent-port={runtime}"]
    command += [f"--metrics-export-port={metrics}", f"--temp-dir={temp_dir / 'ray'}"]
    log = (temp_dir / "head.log").open("w")
    head = subprocess.Popen(
        command,
        env=env | {"PYTHONUNBUFFERED": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        if not _up(temp_dir / "head.log", head, time.monotonic() + startup_s):
            raise RuntimeError(f"the Ray head did not start: {(temp_dir / 'head.log').read_text()[-3000:]}")
        yield RayHead(address=address, env=env, temp_dir=temp_dir)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # whatever of the group did not stop on TERM
        head.wait(timeout=60)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
