"""One poisoned item fails only its own request: the other requests of its server batch get their vectors."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from tests.conftest import POISON
from tests.serve.conftest import API_KEY, app_config, with_api_key

pytestmark = pytest.mark.slow
GOOD = ["a red circle", "a blue square on white", "the sky at night"]


@pytest.fixture(scope="module")
def poisoned_app(serve_http, poisoned_model_dir, table_uri):
    """The poisoned tiny model (NaN vectors for POISON), with a long batch wait so that requests sent together
    share a server batch."""
    config = app_config(poisoned_model_dir, table_uri, batch_wait_timeout_s=0.5)
    with serve_http.deployed("poisoned", config, "/poisoned", **with_api_key()) as url:
        yield url


async def _post_together(url: str, inputs: list[str]) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(headers=headers, timeout=60) as client:
        return await asyncio.gather(*(client.post(f"{url}/v1/embeddings", json={"input": x}) for x in inputs))


def test_a_poisoned_item_gets_its_own_error_and_its_batch_neighbours_their_vectors(poisoned_app, embedder):
    before = httpx.get(f"{poisoned_app}/healthz", timeout=30).json()
    responses = asyncio.run(_post_together(poisoned_app, [GOOD[0], POISON, GOOD[1], GOOD[2]]))
    after = httpx.get(f"{poisoned_app}/healthz", timeout=30).json()
    poisoned = responses[1]
    assert poisoned.status_code == 422, poisoned.text
    error = poisoned.json()["error"]
    assert (
        error["code"] == "forward_failed" and error["param"] == "input" and "non-finite" in error["message"]
    )
    good = [responses[i] for i in (0, 2, 3)]
    assert [r.status_code for r in good] == [200, 200, 200], [r.text for r in good]
    vectors = np.array([r.json()["data"][0]["embedding"] for r in good], np.float32)
    np.testing.assert_allclose(vectors, embedder.embed_batch(GOOD), atol=1e-5)
    # they did share server batches with the poisoned item: fewer batches than requests
    assert after["batched_items"] - before["batched_items"] == 4
    assert after["batches"] - before["batches"] < 4


def test_a_list_with_a_poisoned_item_names_it(poisoned_app):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"input": [GOOD[0], POISON]}
    response = httpx.post(f"{poisoned_app}/v1/embeddings", json=body, headers=headers, timeout=60)
    assert response.status_code == 422 and response.json()["error"]["param"] == "input[1]"
