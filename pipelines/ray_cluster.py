"""Which Ray to join and how many GPUs an actor or replica takes: one answer for the backfill and for Serve."""

from __future__ import annotations

import os


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
