"""Serve refuses the pipeline-benchmark stand-in embedder: its vectors mean nothing."""

from __future__ import annotations

import pytest

from pipelines.config import Config, EmbedderConfig
from serve.app import app_for, build_app
from serve.models import EmbeddingModel

REFUSED = "pipeline-benchmark stand-in .* Serve refuses it"


def test_building_the_app_with_the_stand_in_backend_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=REFUSED):
        build_app({"config": {"embedder": {"backend": "stand-in"}}})


def test_the_app_of_the_transformers_backend_still_builds():
    assert app_for(Config(embedder=EmbedderConfig(backend="transformers"))) is not None


def test_a_model_replica_given_the_stand_in_refuses_before_loading_anything():
    config = Config(embedder=EmbedderConfig(backend="stand-in")).model_dump(mode="json")
    with pytest.raises(ValueError, match=REFUSED):
        EmbeddingModel.func_or_class(config)
