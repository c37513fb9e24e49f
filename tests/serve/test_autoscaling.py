"""The model deployment's autoscaling policy: replicas for the items waiting, not for the calls holding them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipelines.config import ServeConfig
from serve.autoscaling import PENDING_ITEMS, POLICY, pending_items_policy


def context(replicas: int, calls: float, items: dict | None, target: float = 4, target_replicas: int = 1):
    return SimpleNamespace(
        current_num_replicas=replicas,
        target_num_replicas=target_replicas,
        total_num_requests=calls,
        aggregated_metrics=None if items is None else {PENDING_ITEMS: items},
        config=SimpleNamespace(get_target_ongoing_requests=lambda: target),
    )


def test_the_policy_wants_a_replica_per_target_of_waiting_items_summed_over_replicas():
    desired, state = pending_items_policy(context(2, calls=4, items={"r1": 10.0, "r2": 14.0}))
    assert desired == pytest.approx(24 / 4) and state == {}


def test_with_few_items_per_call_the_calls_count_instead():
    assert pending_items_policy(context(1, calls=12, items={"r1": 3.0}))[0] == pytest.approx(12 / 4)


def test_before_replicas_report_items_the_calls_count():
    assert pending_items_policy(context(1, calls=8, items=None))[0] == pytest.approx(2)
    assert pending_items_policy(context(1, calls=8, items={}))[0] == pytest.approx(2)


def test_with_no_replica_running_it_keeps_the_current_target():
    assert pending_items_policy(context(0, calls=5, items=None, target_replicas=3))[0] == 3


def test_an_autoscaling_model_deployment_gets_the_policy_and_an_explicit_one_is_kept():
    from serve.app import deployment_options, with_policy

    options = deployment_options(ServeConfig(min_replicas=1, max_replicas=3))
    assert options["autoscaling_config"]["policy"] == {"policy_function": POLICY}
    assert "autoscaling_config" not in deployment_options(ServeConfig(min_replicas=2, max_replicas=2))
    own = {"policy": {"policy_function": "my.module:policy"}, "min_replicas": 1}
    assert with_policy(own)["policy"] == {"policy_function": "my.module:policy"}


def test_the_policy_path_names_the_function():
    from ray._common.utils import import_module_and_attr

    assert import_module_and_attr(POLICY)[1] is pending_items_policy
