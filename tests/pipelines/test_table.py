"""The vectors table records its embedder configuration, refuses a mismatch, and searches by cosine."""

import numpy as np
import pyarrow as pa
import pytest

from pipelines.config import EmbedderConfig, TableConfig
from pipelines.table import (
    TableConfigMismatch,
    TableNotFound,
    check_matches,
    connect,
    open_vectors_table,
    recorded_embedder_config,
    search_table,
    vectors_schema,
)


@pytest.fixture
def table(tmp_path):
    config = TableConfig(uri=str(tmp_path / "db"))
    schema = vectors_schema(EmbedderConfig(pooling="max"), 4, [pa.field("lang", pa.string())])
    table = connect(config).create_table(config.name, schema=schema)
    vectors = np.array([[1, 0, 0, 0], [0.8, 0.6, 0, 0], [0, 0, 1, 0]], np.float32)
    table.add(
        pa.table(
            {
                "id": ["a", "b", "c"],
                "modality": ["text"] * 3,
                "text": ["alpha", "beta", "gamma"],
                "image_uri": [None] * 3,
                "vector": pa.array(list(vectors), type=pa.list_(pa.float32(), 4)),
                "lang": ["en", "de", "en"],
            },
            schema=schema,
        )
    )
    return open_vectors_table(config)


def test_the_table_records_its_embedder_configuration(table):
    recorded = recorded_embedder_config(table, device="cpu")
    assert recorded.pooling == "max" and recorded.device == "cpu"
    assert pa.types.is_fixed_size_list(table.schema.field("vector").type)
    with pytest.raises(ValueError, match="only runtime options"):
        recorded_embedder_config(table, pooling="mean")


def test_a_different_configuration_or_dimension_is_refused_with_the_differences_named(table):
    check_matches(table, EmbedderConfig(pooling="max", device="cuda"), 4)
    with pytest.raises(TableConfigMismatch, match="pooling: table has 'max', asked for 'mean'"):
        check_matches(table, EmbedderConfig(pooling="mean"), 4)
    with pytest.raises(TableConfigMismatch, match="dimension: table has 4, asked for 8"):
        check_matches(table, EmbedderConfig(pooling="max"), 8)


def test_search_ranks_by_cosine_and_filters(table):
    rows = search_table(table, np.array([1, 0.1, 0, 0], np.float32), top_k=2)
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0]["score"] > rows[1]["score"] and rows[0]["text"] == "alpha"
    filtered = search_table(
        table, np.array([1, 0.1, 0, 0], np.float32), top_k=5, where="lang = 'en'", columns=["lang"]
    )
    assert [r["id"] for r in filtered] == ["a", "c"] and filtered[1]["lang"] == "en"


def test_a_missing_table_is_a_clear_error(tmp_path):
    with pytest.raises(TableNotFound, match="no table 'vectors'"):
        open_vectors_table(TableConfig(uri=str(tmp_path / "empty")))


def _table_recorded_as(tmp_path, config: EmbedderConfig, drop: tuple[str, ...] = ()):
    """A table whose metadata lacks `drop` keys, as tables written by an older vlm-embed do."""
    import json

    from pipelines.table import METADATA_KEY, table_metadata

    table_config = TableConfig(uri=str(tmp_path / "old"))
    metadata = {k: v for k, v in table_metadata(config, 4).items() if k not in drop}
    schema = vectors_schema(config, 4).with_metadata({METADATA_KEY: json.dumps(metadata).encode()})
    connect(table_config).create_table(table_config.name, schema=schema)
    return open_vectors_table(table_config)


def test_a_table_of_the_old_qwen3_vl_embedding_recipe_is_refused_with_the_reason(tmp_path):
    config = EmbedderConfig(recipe="qwen3-vl-embedding")
    old = _table_recorded_as(tmp_path, config, drop=("recipe_version",))
    for refuse in (lambda: recorded_embedder_config(old), lambda: check_matches(old, config, 4)):
        with pytest.raises(TableConfigMismatch, match=r"version 1 of the 'qwen3-vl-embedding' recipe") as err:
            refuse()
        assert "<|endoftext|>" in str(err.value) and "--mode overwrite" in str(err.value)


def test_an_instruct_mean_table_from_before_recipe_versions_still_works(tmp_path):
    config = EmbedderConfig(recipe="instruct-mean")
    old = _table_recorded_as(tmp_path, config, drop=("recipe_version",))
    assert recorded_embedder_config(old).recipe == "instruct-mean"
    check_matches(old, config, 4)


def test_the_table_records_the_recipe_version_and_both_instructions(tmp_path):
    from pipelines.table import recorded_metadata

    config = EmbedderConfig(recipe="qwen3-vl-embedding", query_instruction="Find the product")
    recorded = recorded_metadata(_table_recorded_as(tmp_path, config))
    assert recorded["recipe_version"] == 2
    assert recorded["signature"]["instruction"] == "Represent the user's input."
    assert recorded["signature"]["query_instruction"] == "Find the product."
