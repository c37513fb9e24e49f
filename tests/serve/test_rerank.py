"""POST /rerank and /search with rerank over real HTTP: the official Qwen3-VL-Reranker scores, best first."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from pipelines.config import RerankerConfig
from tests.conftest import image_bytes, make_image
from tests.pipelines import official
from tests.serve.conftest import API_KEY, app_config, with_api_key
from tests.serve.test_search import ROWS, write_table

pytestmark = pytest.mark.slow
QUERY = "a red circle"
DOCUMENTS = ["a red circle on a white background", "three apples on a wooden table", "ein gelber Stern"]


@pytest.fixture(scope="module")
def official_scores(tiny_reranker_dir):
    """The official procedure on the reranker checkpoint: (query, documents) -> scores."""
    return official.reranker_reference(tiny_reranker_dir)


@pytest.fixture(scope="module")
def rerank_app(serve_http, tiny_model_dir, tiny_reranker_dir, embedder, tmp_path_factory):
    """An app with the tiny embedder, the tiny reranker and a table (its image rows name files that are not
    there: they cannot be reranked)."""
    uri = str(tmp_path_factory.mktemp("rerank-serve") / "db")
    config = app_config(tiny_model_dir, uri).model_copy(
        update={"reranker": RerankerConfig(model=str(tiny_reranker_dir), device="cpu", dtype="float32")}
    )
    write_table(uri, embedder)
    with (
        serve_http.deployed("rerank", config, "/rerank-app", **with_api_key()) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as client,
    ):
        yield client


def rerank(client, **body):
    return client.post("/rerank", json=body)


def test_scores_are_the_official_ones_best_first(rerank_app, official_scores):
    response = rerank(rerank_app, query=QUERY, documents=DOCUMENTS)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = official_scores({"text": QUERY}, [{"text": d} for d in DOCUMENTS])
    order = np.argsort(-expected, kind="stable")
    assert [r["index"] for r in body["results"]] == order.tolist()
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], expected[order], atol=1e-5)
    assert body["object"] == "rerank" and body["usage"]["prompt_tokens"] > 0
    assert "document" not in body["results"][0]


def test_top_n_and_return_documents(rerank_app):
    body = rerank(rerank_app, query=QUERY, documents=DOCUMENTS, top_n=2, return_documents=True).json()
    assert len(body["results"]) == 2
    assert all(r["document"] == DOCUMENTS[r["index"]] for r in body["results"])


def test_image_queries_and_documents_are_the_official_scores(rerank_app, official_scores):
    picture = base64.b64encode(image_bytes(3)).decode()
    documents = [{"image": picture}, {"text": "a caption", "image": picture}, "plain text"]
    response = rerank(rerank_app, query={"text": "this picture", "image": picture}, documents=documents)
    assert response.status_code == 200, response.text
    image = make_image(3)
    expected = official_scores(
        {"text": "this picture", "image": image},
        [{"image": image}, {"text": "a caption", "image": image}, {"text": "plain text"}],
    )
    got = {r["index"]: r["relevance_score"] for r in response.json()["results"]}
    np.testing.assert_allclose([got[i] for i in range(3)], expected, atol=1e-5)


def test_the_instruction_changes_the_scores_as_the_official_code_does(rerank_app, official_scores):
    instruction = "Find the document that names a colour."
    body = rerank(rerank_app, query=QUERY, documents=DOCUMENTS, instruction=instruction).json()
    expected = official_scores({"text": QUERY}, [{"text": d} for d in DOCUMENTS], instruction)
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    np.testing.assert_allclose([got[i] for i in range(3)], expected, atol=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"query": QUERY, "documents": ["fine", {"image": "bm90IGFuIGltYWdl"}]}, 422, "documents[1].image"),
        ({"query": QUERY, "documents": []}, 422, "documents"),
        ({"query": QUERY, "documents": ["x"] * 17}, 413, "documents"),
        ({"documents": ["x"]}, 422, "query"),
        ({"query": {"image": "bm90"}, "documents": ["x"]}, 422, "query.image"),
        ({"query": QUERY, "documents": [{"text": "x", "instruction": "y"}]}, 422, "documents[0].instruction"),
        ({"query": QUERY, "documents": ["x"], "top_n": 0}, 422, "top_n"),
        ({"query": QUERY, "documents": ["x"], "model": "other"}, 404, "model"),
    ],
)
def test_bad_requests_get_a_clear_4xx_naming_the_field(rerank_app, body, status, param):
    response = rerank(rerank_app, **body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_a_server_without_a_reranker_says_so(client):
    response = client.post("/rerank", json={"query": "q", "documents": ["d"]})
    assert response.status_code == 404 and response.json()["error"]["code"] == "reranker_not_configured"
    response = client.post("/search", json={"text": "q", "rerank": True})
    assert response.status_code == 404 and "reranker" in response.json()["error"]["message"]


def test_search_with_rerank_orders_the_candidates_by_the_official_score(rerank_app, official_scores):
    response = rerank_app.post("/search", json={"text": QUERY, "top_k": 3, "rerank": True})
    assert response.status_code == 200, response.text
    rows = response.json()["data"]
    folder_rows = {r[0]: r for r in ROWS}
    assert len(rows) == 3 and all(row["rerank_score"] is not None for row in rows)
    scores = [row["rerank_score"] for row in rows]
    assert scores == sorted(scores, reverse=True)
    everything = rerank_app.post("/search", json={"text": QUERY, "top_k": len(ROWS), "rerank": True}).json()
    by_id = {row["id"]: row for row in everything["data"]}
    for row_id in ("t-red", "t-blue"):  # text rows: the official score of (query, the row's text)
        expected = official_scores({"text": QUERY}, [{"text": folder_rows[row_id][2]}])[0]
        assert by_id[row_id]["rerank_score"] == pytest.approx(expected, abs=1e-5)
        assert -1 <= by_id[row_id]["score"] <= 1  # the cosine score is kept beside it


def test_rows_whose_image_cannot_be_read_come_last_with_the_reason(rerank_app):
    rows = rerank_app.post("/search", json={"text": QUERY, "top_k": len(ROWS), "rerank": True}).json()["data"]
    assert [row["rerank_score"] is None for row in rows] == [False, False, False, True, True]
    assert {row["id"] for row in rows[3:]} == {"i-1", "p-2"}
    assert all(
        "image_unreadable" in row["rerank_error"] and "img-" in row["rerank_error"] for row in rows[3:]
    )


def test_search_rerank_candidates_over_the_limit_is_a_422(rerank_app):
    response = rerank_app.post("/search", json={"text": QUERY, "rerank": True, "rerank_candidates": 17})
    assert response.status_code == 422 and response.json()["error"]["param"] == "rerank_candidates"


def test_health_and_models_name_the_reranker(rerank_app, tiny_reranker_dir):
    health = rerank_app.get("/healthz").json()
    assert health["status"] == "ok" and health["reranker"]["status"] == "ok"
    assert [m["id"] for m in rerank_app.get("/v1/models").json()["data"]][1] == str(tiny_reranker_dir)


def test_rerank_needs_the_api_key_like_every_route(rerank_app):
    import httpx

    response = httpx.post(
        f"{rerank_app.base_url}rerank", json={"query": QUERY, "documents": DOCUMENTS}, timeout=30
    )
    assert response.status_code == 401, response.text
