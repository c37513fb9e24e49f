"""Serve with the qwen3-vl-embedding recipe: documents and queries over HTTP are the official vectors."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from pipelines.config import TableConfig
from tests.pipelines import official
from tests.serve.conftest import API_KEY, app_config, with_api_key
from tests.serve.test_search import write_table

pytestmark = pytest.mark.slow
TEXTS = ["a red circle", "a blue square on a white background", "ein gelber Stern"]
QUERY = "which shape is red?"


@pytest.fixture(scope="module")
def reference(tiny_embedding_dir):
    """The official procedure on the same checkpoint: a function from conversations to vectors."""
    return official.embedding_reference(tiny_embedding_dir)


@pytest.fixture(scope="module")
def embedding_app(serve_http, tiny_embedding_dir, tmp_path_factory):
    from pipelines.embedder import Embedder

    uri = str(tmp_path_factory.mktemp("embedding-serve") / "db")
    config = app_config(tiny_embedding_dir, uri)
    assert config.embedder.recipe == "qwen3-vl-embedding"
    embedder = Embedder.from_config(config.embedder)
    rows = [(f"t-{i}", "text", text, None, "en") for i, text in enumerate(TEXTS)]
    write_table(uri, embedder, rows)
    with (
        serve_http.deployed("embedding", config, "/embedding", **with_api_key()) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as client,
    ):
        yield client, uri, embedder


def _vectors(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([row["embedding"] for row in response.json()["data"]], np.float32)


def test_documents_and_queries_over_http_are_the_official_vectors(embedding_app, reference):
    client, _, _ = embedding_app
    documents = reference([official.embedding_conversation(text) for text in TEXTS])
    queries = reference([official.embedding_conversation(t, None, official.QUERY_INSTRUCTION) for t in TEXTS])
    got = _vectors(client.post("/v1/embeddings", json={"input": TEXTS}))
    np.testing.assert_allclose(got, documents, atol=1e-5, rtol=0)
    got = _vectors(client.post("/v1/embeddings", json={"input": TEXTS, "input_type": "query"}))
    np.testing.assert_allclose(got, queries, atol=1e-5, rtol=0)


def test_an_items_instruction_wins_over_the_input_type(embedding_app, reference):
    client, _, _ = embedding_app
    body = {"input": [{"text": "a red circle", "instruction": "Match the caption"}], "input_type": "query"}
    expected = reference([official.embedding_conversation("a red circle", None, "Match the caption")])
    np.testing.assert_allclose(_vectors(client.post("/v1/embeddings", json=body)), expected, atol=1e-5)


def test_an_unknown_input_type_is_a_422_naming_the_field(embedding_app):
    client, _, _ = embedding_app
    response = client.post("/v1/embeddings", json={"input": "x", "input_type": "passage"})
    assert response.status_code == 422 and "input_type" in response.text


def test_search_scores_are_the_official_query_against_the_official_documents(embedding_app, reference):
    client, _, _ = embedding_app
    documents = reference([official.embedding_conversation(text) for text in TEXTS])
    query = reference([official.embedding_conversation(QUERY, None, official.QUERY_INSTRUCTION)])[0]
    response = client.post("/search", json={"text": QUERY, "top_k": 3})
    assert response.status_code == 200, response.text
    expected = {f"t-{i}": float(score) for i, score in enumerate(documents @ query)}
    for row in response.json()["data"]:
        assert row["score"] == pytest.approx(expected[row["id"]], abs=1e-5)


def test_a_table_of_the_old_recipe_is_refused_with_409(embedding_app, tmp_path):
    import json

    import pyarrow as pa

    from pipelines.table import METADATA_KEY, connect, open_vectors_table, recorded_metadata

    client, uri, _ = embedding_app
    table = open_vectors_table(TableConfig(uri=uri))
    metadata = recorded_metadata(table)
    old = {k: v for k, v in metadata.items() if k != "recipe_version"}
    data = table.to_arrow()
    schema = data.schema.with_metadata({METADATA_KEY: json.dumps(old).encode()})
    connect(TableConfig(uri=uri)).create_table(
        "vectors", data=pa.Table.from_batches(data.to_batches(), schema), mode="overwrite"
    )
    try:
        response = client.post("/search", json={"text": QUERY})
        assert response.status_code == 409, response.text
        assert "version 1 of the 'qwen3-vl-embedding' recipe" in response.json()["error"]["message"]
    finally:
        restored = data.schema.with_metadata({METADATA_KEY: json.dumps(metadata).encode()})
        connect(TableConfig(uri=uri)).create_table(
            "vectors", data=pa.Table.from_batches(data.to_batches(), restored), mode="overwrite"
        )


def test_an_embedding_only_checkpoint_refuses_chat(embedding_app, tiny_embedding_dir):
    """Refused when the app is built with an answer: section, and over HTTP by this app, which has none (its
    checkpoint cannot generate: that is the reason given); moved here from test_chat so that no app of its own
    is started for it."""
    from pipelines.config import AnswerConfig
    from serve.app import app_for

    client, uri, _ = embedding_app
    config = app_config(tiny_embedding_dir, uri)
    with pytest.raises(ValueError, match="embedding-only"):
        app_for(config.model_copy(update={"answer": AnswerConfig()}))
    question = {"messages": [{"role": "user", "content": QUERY}], "max_tokens": 16, "temperature": 0}
    response = client.post("/v1/chat/completions", json=question)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "generation_not_supported" and "embedding-only" in error["message"]
