"""Serve with the sentence-transformers backend (the real all-MiniLM-L6-v2), over HTTP on 127.0.0.1:
/v1/embeddings gives the library's own vectors, an image input is a 422 naming the backend, and /search queries
a table of MiniLM vectors on disk."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pyarrow as pa
import pytest

from pipelines.backends import load_embedder
from pipelines.config import Config, ServeConfig, TableConfig
from pipelines.table import connect, vectors_schema
from tests.conftest import image_bytes
from tests.minilm import minilm_config
from tests.serve.conftest import LIMITS

ROWS = {
    "thunder": "Thunder is the sound of air expanding violently when lightning heats it.",
    "bread": "Bread rises because yeast releases carbon dioxide that the dough traps.",
    "glacier": "Glaciers are rivers of ice that carve U-shaped valleys into mountains.",
}


@pytest.fixture(scope="module")
def minilm():
    return load_embedder(minilm_config())


@pytest.fixture(scope="module")
def app(serve_http, minilm, tmp_path_factory):
    """A MiniLM table on disk (made as a backfill makes it: the schema records the embedder) and the app."""
    table = TableConfig(uri=str(tmp_path_factory.mktemp("minilm-db") / "lancedb"))
    vectors = minilm.embed_batch(list(ROWS.values()))
    schema = vectors_schema(minilm.config, vectors.shape[1])
    connect(table).create_table(table.name, schema=schema).add(
        pa.table(
            {
                "id": list(ROWS),
                "modality": ["text"] * len(ROWS),
                "text": list(ROWS.values()),
                "image_uri": [None] * len(ROWS),
                "vector": pa.array(list(vectors), type=pa.list_(pa.float32(), vectors.shape[1])),
            },
            schema=schema,
        )
    )
    config = Config(
        embedder=minilm_config(),
        table=table,
        serve=ServeConfig(**{**LIMITS, "num_cpus": 0.25, "ingress_num_cpus": 0.25}),
    )
    with (
        serve_http.deployed("minilm", config, "/minilm") as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


def test_embeddings_are_the_librarys_own(app, minilm):
    texts = ["how loud is thunder", "a loaf of bread"]
    response = app.post("/v1/embeddings", json={"input": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    vectors = np.array([row["embedding"] for row in body["data"]], np.float32)
    np.testing.assert_allclose(vectors, minilm.model.encode(texts, convert_to_numpy=True), atol=1e-5)
    assert body["usage"]["prompt_tokens"] == sum(minilm.prepare(t).num_tokens for t in texts)


def test_an_image_input_is_a_422_naming_the_backend(app):
    image = base64.b64encode(image_bytes(0)).decode()
    response = app.post("/v1/embeddings", json={"input": [{"text": "a caption", "image": image}]})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert "sentence-transformers backend" in error["message"] and "texts only" in error["message"]
    assert error["param"] == "input[0].image" and error["code"] == "unsupported_modality"


def test_search_finds_the_row_that_answers(app, minilm):
    response = app.post("/search", json={"text": "what makes the sound after lightning", "top_k": 2})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data[0]["id"] == "thunder"
    expected = float(
        minilm.embed_queries(["what makes the sound after lightning"])[0] @ minilm.embed_text(ROWS["thunder"])
    )
    assert data[0]["score"] == pytest.approx(expected, abs=1e-5)


def test_the_health_check_reports_the_models_dimension(app):
    health = app.get("/healthz").json()
    assert health["status"] == "ok" and health["dimension"] == 384
