"""POST /search with mode text and hybrid, and on tables made by `vlm-embed reduce`, over real HTTP."""

from __future__ import annotations

import pytest
from lancedb.index import FTS

from pipelines.config import TableConfig
from pipelines.reduce import reduce_table
from pipelines.search import search as python_search
from pipelines.table import connect
from tests.conftest import image_bytes
from tests.serve.test_search import ROWS, search, write_table


@pytest.fixture
def indexed(table_uri, embedder):
    """The app's table with the full-text index a backfill builds."""
    vectors = write_table(table_uri, embedder)
    connect(TableConfig(uri=table_uri)).open_table("vectors").create_index("text", config=FTS())
    return vectors


def test_text_mode_is_the_full_text_search_and_embeds_nothing(client, indexed, table_uri):
    response = search(client, text="circle", mode="text", top_k=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [row["id"] for row in body["data"]] == ["t-red"] and body["usage"]["prompt_tokens"] == 0
    expected = python_search(TableConfig(uri=table_uri), "circle", mode="text", top_k=3)
    assert body["data"][0]["score"] == pytest.approx(expected[0]["score"])


def test_hybrid_mode_answers_what_the_python_search_answers(client, indexed, table_uri, embedder):
    response = search(client, text="a blue square", mode="hybrid", top_k=4, filter="lang = 'en'")
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    expected = python_search(
        TableConfig(uri=table_uri),
        "a blue square",
        mode="hybrid",
        top_k=4,
        where="lang = 'en'",
        embedder=embedder,
    )
    assert [row["id"] for row in data] == [row["id"] for row in expected]
    assert [row["score"] for row in data] == pytest.approx([row["score"] for row in expected])
    assert data[0]["id"] == "t-blue"
    assert [r["vector_score"] for r in data] == pytest.approx([r["vector_score"] for r in expected], abs=1e-5)


def test_an_image_in_text_or_hybrid_mode_is_a_422_naming_mode(client, indexed):
    import base64

    image = base64.b64encode(image_bytes(1)).decode()
    for body in ({"image": image, "mode": "hybrid"}, {"image": image, "text": "x", "mode": "text"}):
        response = search(client, **body)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == "mode"
    response = search(client, text="x", mode="semantic")
    assert response.status_code == 422 and "mode" in response.text


def test_a_table_without_a_full_text_index_refuses_text_mode(client, table_uri, embedder):
    write_table(table_uri, embedder)
    response = search(client, text="circle", mode="text")
    assert response.status_code == 422, response.text
    assert "no full-text index on 'text'" in response.json()["error"]["message"]


def test_a_pca_table_gets_its_query_projected_like_the_python_search(client, table_uri, embedder):
    source = TableConfig(uri=table_uri, name="source")
    db = connect(source)
    write_table(table_uri, embedder)  # the rows, then renamed by copying them into "source"
    db.create_table("source", db.open_table("vectors").to_arrow(), mode="overwrite")
    db.open_table("source").create_index("text", config=FTS())
    for name in ("vectors", "vectors__projection"):
        db.drop_table(name, ignore_missing=True)
    reduce_table(source, "vectors", 4, storage="int8")
    try:
        for row_id, _, text, _, _ in (r for r in ROWS if r[2] is not None and r[3] is None):
            data = search(client, text=text, top_k=2).json()["data"]
            assert data[0]["id"] == row_id and data[0]["score"] > 0.99
            expected = python_search(TableConfig(uri=table_uri), text, top_k=2, embedder=embedder)
            assert [r["score"] for r in data] == pytest.approx([r["score"] for r in expected], abs=1e-5)
    finally:
        db.drop_table("vectors__projection", ignore_missing=True)
