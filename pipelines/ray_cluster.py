"""Which Ray to join, how many GPUs an actor or replica takes (one answer for the backfill and for Serve), and
where work that must not grow the driver runs."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any


def ray_address(configured: str | None, given: str | None = None) -> str | None:
    """The address for `ray.init`: `given` (a command's `--address`), else the config's `ray_address`, else
    None when RAY_ADDRESS names a cluster (`ray job submit` sets it; Ray reads it), else "local" (a new local
    Ray, never a stale cluster found on this machine)."""
    return given or configured or (None if os.environ.get("RAY_ADDRESS") else "local")


def resolve_num_gpus(configured: float | None) -> float:
    """GPUs per actor or replica: as configured, else 1 when the connected Ray cluster has a GPU, else 0."""
    if configured is not None:
        return configured
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1:
        return 1
    return 0


def off_driver(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a Ray worker process, and its result (in this process when Ray is not running).

    For the table upkeep: an update of the BTREE index on `id`, a compaction, an IVF_PQ or full-text build each
    take memory that grows with the table (measured: the driver's peak went from 786 MiB at 10^6 rows to
    1,495 MiB at 10^7 while it held O(units) itself), and the driver's must not. The task asks for no CPU (the
    embedding workers may hold every CPU of the cluster while a run commits) and is sent, softly, to
    `upkeep_node()`. Ray retries it if its worker dies; `fn` must be safe to run twice."""
    import ray

    if not ray.is_initialized():
        return fn(*args)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options: dict[str, Any] = {"num_cpus": 0}
    node = upkeep_node()
    if node is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
    return ray.get(_remote(fn).options(**options).remote(*args))


@functools.lru_cache(maxsize=16)
def _remote(fn: Callable[..., Any]):
    import ray

    return ray.remote(fn)


def upkeep_node() -> str | None:
    """The node `off_driver` sends its work to (`choose_upkeep_node` over Ray's list of nodes)."""
    import ray

    return choose_upkeep_node(ray.nodes(), ray.get_runtime_context().get_node_id())


def choose_upkeep_node(nodes: list[dict], here: str) -> str | None:
    """The alive node with CPUs and the most memory, other than `here` (the driver's) where there is one: a
    worker node, not a head started with `num-cpus: 0` (cluster/kuberay). None when no node has CPUs."""
    alive = [n for n in nodes if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    others = [n for n in alive if n["NodeID"] != here]
    best = max(others or alive, key=lambda n: n["Resources"].get("memory", 0), default=None)
    return None if best is None else best["NodeID"]
