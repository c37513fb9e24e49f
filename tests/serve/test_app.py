"""The Serve app over real HTTP on 127.0.0.1: OpenAI compatibility, parity with the embedder, batching, auth."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import image_bytes
from tests.serve.conftest import API_KEY, app_config, b64_image

TOLERANCE = 1e-5


def openai_client(url: str, api_key: str = API_KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=api_key, timeout=60, max_retries=0)


def vectors_of(response_json) -> np.ndarray:
    data = sorted(response_json["data"], key=lambda d: d["index"])
    return np.array([d["embedding"] for d in data], np.float32)


def test_openai_client_gets_float_vectors_equal_to_the_embedders(main_app, embedder):
    texts = ["a red circle", "a blue square on a white background", "x"]
    result = openai_client(main_app).embeddings.create(
        model=str(embedder.config.model), input=texts, encoding_format="float"
    )
    got = np.array([d.embedding for d in result.data], np.float32)
    assert [d.index for d in result.data] == [0, 1, 2]
    assert result.object == "list" and result.model == embedder.config.model
    np.testing.assert_allclose(got, embedder.embed_batch(texts), atol=TOLERANCE)
    expected_tokens = sum(embedder.prepare(t).num_tokens for t in texts)
    assert result.usage.prompt_tokens == result.usage.total_tokens == expected_tokens


def test_openai_client_base64_vectors_decode_to_the_same_values(main_app, embedder):
    client = openai_client(main_app)
    explicit = client.embeddings.create(
        model=embedder.config.model, input="a yellow star", encoding_format="base64"
    )
    raw = explicit.data[0].embedding
    assert isinstance(raw, str)
    decoded = np.frombuffer(base64.b64decode(raw), "<f4")
    np.testing.assert_allclose(decoded, embedder.embed_text("a yellow star"), atol=TOLERANCE)
    # Without encoding_format the client asks for base64 itself and decodes it to floats.
    default = client.embeddings.create(model=embedder.config.model, input=["a yellow star"])
    np.testing.assert_allclose(np.array(default.data[0].embedding), decoded, atol=TOLERANCE)


def test_dimensions_gives_what_an_embedder_with_those_dimensions_gives(main_app, embedder):
    from pipelines.embedder import Embedder

    small = Embedder(
        embedder.model,
        embedder.tokenizer,
        image_processor=embedder.image_processor,
        config=embedder.config.model_copy(update={"dimensions": 16}),
    )
    result = openai_client(main_app).embeddings.create(
        model=embedder.config.model, input=["a green triangle"], dimensions=16, encoding_format="float"
    )
    got = np.array(result.data[0].embedding, np.float32)
    assert got.shape == (16,)
    np.testing.assert_allclose(got, small.embed_text("a green triangle"), atol=TOLERANCE)


def test_multimodal_items_with_base64_and_data_url_images_match_the_embedder(client, embedder):
    png, jpeg = image_bytes(1), image_bytes(2, (80, 120), "JPEG")
    body = {
        "input": [
            {"image": base64.b64encode(png).decode()},
            {"text": "a caption", "image": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()},
            "just text",
        ]
    }
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == 200, response.text
    expected = embedder.embed_batch([{"image": png}, {"text": "a caption", "image": jpeg}, "just text"])
    np.testing.assert_allclose(vectors_of(response.json()), expected, atol=TOLERANCE)


def test_models_lists_the_served_model_and_healthz_reports_a_loaded_model(client, embedder):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [embedder.config.model]
    health = client.get("/healthz", headers={"Authorization": ""})
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["dimension"] == embedder.get_embedding_dimension()


def test_concurrent_requests_share_forward_passes(client, main_app):
    import httpx

    before = client.get("/healthz").json()
    texts = [f"request number {i} " + "word " * (i % 7) for i in range(48)]

    def one(text):
        with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
            return c.post(f"{main_app}/v1/embeddings", json={"input": text}).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, texts))
    after = client.get("/healthz").json()
    assert statuses == [200] * len(texts)
    batches = after["batches"] - before["batches"]
    items = after["batched_items"] - before["batched_items"]
    assert items == len(texts)
    assert batches < items, f"{items} items took {batches} forward passes: requests were not batched"
    assert after["largest_batch"] > 1


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic dGVzdA=="}, {"X-API-Key": "nope"}],
)
def test_without_the_api_key_requests_get_401(main_app, headers):
    import httpx

    response = httpx.post(f"{main_app}/v1/embeddings", json={"input": "hi"}, headers=headers, timeout=30)
    assert response.status_code == 401
    assert "API key" in response.json()["error"]["message"]
    assert httpx.get(f"{main_app}/v1/models", headers=headers, timeout=30).status_code == 401


def test_the_api_key_is_accepted_as_x_api_key_too(main_app):
    import httpx

    response = httpx.post(
        f"{main_app}/v1/embeddings", json={"input": "hi"}, headers={"X-API-Key": API_KEY}, timeout=30
    )
    assert response.status_code == 200


def test_openai_client_surfaces_a_bad_request_as_its_error(main_app, embedder):
    import openai

    with pytest.raises(openai.UnprocessableEntityError, match="empty or only whitespace"):
        openai_client(main_app).embeddings.create(model=embedder.config.model, input=["fine", "   "])
    with pytest.raises(openai.AuthenticationError):
        openai_client(main_app, api_key="wrong").embeddings.create(model=embedder.config.model, input="x")


def test_an_image_is_embedded_the_same_alone_or_batched_with_others(client):
    image = b64_image(5)
    alone = vectors_of(client.post("/v1/embeddings", json={"input": [{"image": image}]}).json())
    mixed = client.post(
        "/v1/embeddings",
        json={"input": ["long text " * 30, {"image": image}, {"text": "t", "image": b64_image(6)}]},
    )
    np.testing.assert_allclose(vectors_of(mixed.json())[1], alone[0], atol=TOLERANCE)


@pytest.fixture(scope="module")
def slow_model_app(serve_http, tiny_model_dir, table_uri):
    """The model replica waits 0.3 s for every batch to fill: calls to it stay out long enough to pile up."""
    from ray import serve

    config = app_config(
        tiny_model_dir, table_uri, batch_wait_timeout_s=0.3, api_key_env="VLM_EMBED_UNSET_KEY_VARIABLE"
    )
    yield serve_http.deploy("slow-model", config, "/slow-model")
    serve.delete("slow-model")


def test_requests_arriving_while_model_calls_are_out_go_to_the_model_together_each_getting_its_rows(
    slow_model_app, embedder
):
    import httpx

    requests = [
        [f"request {i} item {j} " + "word " * ((i + j) % 5) for j in range(1 + i % 3)] for i in range(24)
    ]

    def one(texts):
        with httpx.Client(timeout=60) as c:
            return c.post(f"{slow_model_app}/v1/embeddings", json={"input": texts})

    before = httpx.get(f"{slow_model_app}/healthz", timeout=10).json()
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(one, requests))
    after = httpx.get(f"{slow_model_app}/healthz", timeout=10).json()
    for texts, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(vectors_of(response.json()), embedder.embed_batch(texts), atol=TOLERANCE)
    calls = after["model_calls"] - before["model_calls"]
    assert calls <= len(requests) // 2, (
        f"{len(requests)} requests took {calls} model calls: none went together"
    )
