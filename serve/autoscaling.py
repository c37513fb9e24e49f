"""How the model deployment scales: on the items waiting in its replicas, not on the calls they hold.

Serve's default policy counts ongoing requests per replica. An ingress replica sends the requests that arrive
while its calls are out together (`serve.coalesce`), so under load a model replica holds a few calls however
many requests wait, and counting calls would never scale it out. Each model replica reports the items it
holds (`record_autoscaling_stats` -> `pending_items`); this policy wants `target_ongoing_requests` of them per
replica (or of calls, if that is more). Serve applies the config's min/max replicas, delays and factors around
it. Standard library only: Serve ships the policy to its controller by value.
"""

from __future__ import annotations

from typing import Any

PENDING_ITEMS = "pending_items"
POLICY = "serve.autoscaling:pending_items_policy"


def pending_items_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Desired model replicas: the items their batch queues hold, averaged over the look-back period and
    summed over replicas, divided by `target_ongoing_requests`."""
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    reported = (ctx.aggregated_metrics or {}).get(PENDING_ITEMS) or {}
    load = max(float(sum(reported.values())), float(ctx.total_num_requests))
    return load / ctx.config.get_target_ongoing_requests(), {}
