"""One answer to "which Ray" and "how many GPUs", for the backfill and for Serve."""

from __future__ import annotations

from pipelines.ray_cluster import ray_address, resolve_num_gpus


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
