"""`load_embedder` picks the class a config's backend names, and the backend is part of a table's signature."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipelines.backends import load_embedder
from pipelines.config import EmbedderConfig
from pipelines.embedder import Embedder
from pipelines.table import METADATA_KEY, TableConfigMismatch, check_matches, table_metadata


def test_transformers_backend_loads_the_qwen3_vl_embedder(tiny_model_dir):
    embedder = load_embedder(EmbedderConfig(model=str(tiny_model_dir)))
    assert isinstance(embedder, Embedder)


def test_backend_is_recorded_in_the_signature():
    assert EmbedderConfig().signature()["backend"] == "transformers"


def _table_with(tmp_path, metadata: dict):
    import lancedb

    schema = pa.schema([pa.field("id", pa.string())], metadata={METADATA_KEY: json.dumps(metadata)})
    return lancedb.connect(tmp_path).create_table("vectors", schema=schema)


def test_a_table_from_before_backends_matches_the_transformers_backend(tmp_path):
    config = EmbedderConfig()
    metadata = table_metadata(config, 64)
    del metadata["signature"]["backend"]
    check_matches(_table_with(tmp_path, metadata), config, 64)


def test_a_table_of_another_backend_is_refused_naming_the_backend(tmp_path):
    theirs = table_metadata(EmbedderConfig(), 64)
    theirs["signature"]["backend"] = "sentence-transformers"
    with pytest.raises(TableConfigMismatch, match="backend: table has 'sentence-transformers'"):
        check_matches(_table_with(tmp_path, theirs), EmbedderConfig(), 64)
