"""One answer to "which Ray" and "how many GPUs", for the backfill and for Serve; work kept off the driver."""

from __future__ import annotations

import os

from pipelines.ray_cluster import choose_upkeep_node, off_driver, ray_address, resolve_num_gpus


def test_a_given_address_wins_then_the_configured_one(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_address("auto", "ray://head:10001") == "ray://head:10001"
    assert ray_address("auto") == "auto"


def test_without_an_address_ray_address_in_the_environment_is_left_to_ray(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_address(None) is None


def test_without_any_address_a_new_local_ray_is_started(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(None) == "local"


def test_configured_gpus_are_taken_as_they_are_even_zero():
    assert resolve_num_gpus(0.5) == 0.5
    assert resolve_num_gpus(0) == 0


def test_unset_gpus_on_a_cluster_without_gpus_are_none(ray_session):
    assert resolve_num_gpus(None) == 0


def node(node_id, cpus, memory, alive=True):
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": cpus, "memory": memory}}


def test_upkeep_goes_to_the_roomiest_worker_node_never_a_head_without_cpus():
    nodes = [
        node("head", 0, 64e9),
        node("small", 8, 16e9),
        node("big", 8, 32e9),
        node("dead", 8, 99e9, False),
    ]
    assert choose_upkeep_node(nodes, here="head") == "big"


def test_upkeep_leaves_the_drivers_node_when_another_has_cpus():
    nodes = [node("driver", 16, 64e9), node("worker", 2, 8e9)]
    assert choose_upkeep_node(nodes, here="driver") == "worker"
    assert choose_upkeep_node(nodes[:1], here="driver") == "driver"  # a one-node cluster: there is no other
    assert choose_upkeep_node([node("head", 0, 64e9)], here="head") is None


def process_and_sum(*numbers):
    return os.getpid(), sum(numbers)


def test_off_driver_work_runs_in_a_ray_worker_process_and_returns_its_result(ray_session):
    pid, total = off_driver(process_and_sum, 17, 5)
    assert pid != os.getpid() and total == 22


def test_off_driver_work_runs_here_when_ray_is_not_running(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert off_driver(process_and_sum, 1, 2) == (os.getpid(), 3)
