"""POST /search over real HTTP against a LanceDB table on disk built with the embedder's own vectors."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pyarrow as pa
import pytest

from pipelines.config import TableConfig
from pipelines.table import connect, vectors_schema
from tests.conftest import image_bytes
from tests.serve.conftest import LIMITS

ROWS = [
    ("t-red", "text", "a red circle", None, "en"),
    ("t-blue", "text", "a blue square on a white background", None, "en"),
    ("t-de", "text", "ein gelber Stern", None, "de"),
    ("i-1", "image", None, 1, "en"),
    ("p-2", "text+image", "a photo with a caption", 2, "de"),
]


def row_item(text, image_seed):
    if image_seed is None:
        return text
    item = {"image": image_bytes(image_seed)}
    return {**item, "text": text} if text is not None else item


def write_table(table_uri, embedder, rows=ROWS):
    """The vectors table the app searches, made the way a backfill makes it (schema metadata included)."""
    config = TableConfig(uri=table_uri)
    vectors = embedder.embed_batch([row_item(text, seed) for _, _, text, seed, _ in rows])
    dimension = vectors.shape[1]
    schema = vectors_schema(embedder.config, dimension, [pa.field("lang", pa.string())])
    table = connect(config).create_table(config.name, schema=schema, mode="overwrite")
    table.add(
        pa.table(
            {
                "id": [r[0] for r in rows],
                "modality": [r[1] for r in rows],
                "text": [r[2] for r in rows],
                "image_uri": [None if r[3] is None else f"img-{r[3]}.png" for r in rows],
                "vector": pa.array(list(vectors), type=pa.list_(pa.float32(), dimension)),
                "lang": [r[4] for r in rows],
            },
            schema=schema,
        )
    )
    return vectors


@pytest.fixture
def table(table_uri, embedder):
    return write_table(table_uri, embedder)


def search(client, **body):
    return client.post("/search", json=body)


def test_a_text_query_ranks_rows_by_cosine_and_finds_its_own_text_first(client, table, embedder):
    response = search(client, text="a red circle", top_k=3)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    query = embedder.embed_text("a red circle")
    expected = np.argsort(-(table @ query))[:3]
    assert [row["id"] for row in data] == [ROWS[i][0] for i in expected]
    assert data[0]["id"] == "t-red" and data[0]["text"] == "a red circle"
    assert data[0]["score"] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose([row["score"] for row in data], (table @ query)[expected], atol=1e-5)
    assert response.json()["usage"]["prompt_tokens"] == embedder.prepare("a red circle").num_tokens


def test_an_image_query_finds_the_row_of_that_image(client, table):
    image = base64.b64encode(image_bytes(1)).decode()
    data = search(client, image=image, top_k=1).json()["data"]
    assert data[0]["id"] == "i-1" and data[0]["modality"] == "image" and data[0]["image_uri"] == "img-1.png"
    assert data[0]["score"] == pytest.approx(1.0, abs=1e-5)
    pair = search(
        client, text="a photo with a caption", image=base64.b64encode(image_bytes(2)).decode(), top_k=1
    )
    assert pair.json()["data"][0]["id"] == "p-2"


def test_a_filter_keeps_only_matching_rows(client, table):
    data = search(client, text="a red circle", top_k=10, filter="lang = 'de'").json()["data"]
    assert sorted(row["id"] for row in data) == ["p-2", "t-de"]


def test_top_k_limits_the_rows_and_is_bounded(client, table):
    assert len(search(client, text="circle", top_k=2).json()["data"]) == 2
    too_many = search(client, text="circle", top_k=10_000)
    assert too_many.status_code == 422 and too_many.json()["error"]["param"] == "top_k"
    zero = search(client, text="circle", top_k=0)
    assert zero.status_code == 422 and zero.json()["error"]["param"] == "top_k"


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"top_k": 3}, 422, "text", "needs 'text' or 'image'"),
        ({"text": 5}, 422, "text", "valid string"),
        ({"text": "x" * (LIMITS["max_text_chars"] + 1)}, 422, "text", "characters long"),
        ({"image": "https://example.com/a.png"}, 422, "image", "inline"),
        ({"image": "%%%"}, 422, "image", "not valid base64"),
        ({"image": base64.b64encode(b"not an image").decode()}, 422, "image", "not a readable image"),
        ({"text": "a", "filter": "no_such_column = 1"}, 422, "filter", "names column 'no_such_column'"),
        ({"text": "a", "filter": "lang = "}, 422, "filter", "is not valid SQL"),
        ({"text": "a", "query": "b"}, 422, "query", "Extra inputs"),
        ({"text": "a", "model": "other-model"}, 404, "model", "not served here"),
    ],
)
def test_a_bad_search_request_gets_its_status_and_names_the_field(client, table, body, status, param, words):
    response = search(client, **body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    assert words in response.json()["error"]["message"]


def test_a_table_made_at_a_smaller_dimension_is_queried_with_truncated_vectors(client, table_uri, embedder):
    from pipelines.embedder import Embedder

    small = Embedder(
        embedder.model,
        embedder.tokenizer,
        image_processor=embedder.image_processor,
        config=embedder.config.model_copy(update={"dimensions": 16}),
    )
    vectors = write_table(table_uri, small)
    assert vectors.shape[1] == 16
    data = search(client, text="a blue square on a white background", top_k=2).json()["data"]
    assert data[0]["id"] == "t-blue" and data[0]["score"] == pytest.approx(1.0, abs=1e-5)
    query = small.embed_text("a blue square on a white background")
    assert data[1]["score"] == pytest.approx(float(np.sort(vectors @ query)[-2]), abs=1e-5)


def test_a_table_embedded_with_another_configuration_is_refused_with_the_differences(
    client, table_uri, embedder
):
    from pipelines.embedder import Embedder

    other = Embedder(
        embedder.model,
        embedder.tokenizer,
        image_processor=embedder.image_processor,
        config=embedder.config.model_copy(update={"pooling": "max"}),
    )
    write_table(table_uri, other)
    response = search(client, text="a red circle")
    assert response.status_code == 409
    message = response.json()["error"]["message"]
    assert "pooling: table has 'max', asked for 'mean'" in message


def test_a_missing_table_is_a_404_that_says_so(client, table_uri):
    connect(TableConfig(uri=table_uri)).drop_table("vectors", ignore_missing=True)
    response = search(client, text="a red circle")
    assert response.status_code == 404
    assert "no table 'vectors'" in response.json()["error"]["message"]


def test_search_needs_the_api_key(main_app, table):
    response = httpx.post(f"{main_app}/search", json={"text": "a red circle"}, timeout=30)
    assert response.status_code == 401
