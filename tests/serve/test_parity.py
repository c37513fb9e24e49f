"""Parity of the two paths: an item's vector over HTTP equals the vector the backfill stored for it."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from pipelines.config import Config, EmbedderConfig, SourceConfig, TableConfig
from pipelines.table import open_vectors_table
from tests.conftest import image_bytes

pytestmark = pytest.mark.slow
ROWS = [
    {"id": "t-1", "text": "a red circle on a white background"},
    {"id": "t-2", "text": "quarterly report, page three: revenue by region"},
    {"id": "p-1", "text": "a photo of a green triangle", "image": "p1.png"},
    {"id": "i-1", "image": "i1.jpg"},
]


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory, tiny_model_dir, table_uri, ray_session):
    """The corpus backfilled (Ray Data -> LanceDB) into the table the main app searches."""
    from pipelines.backfill import run_backfill

    folder = tmp_path_factory.mktemp("parity-corpus")
    images = {"p1.png": image_bytes(11), "i1.jpg": image_bytes(12, (120, 90), "JPEG")}
    for name, data in images.items():
        (folder / name).write_bytes(data)
    (folder / "items.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    config = Config(
        embedder=EmbedderConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"),
        sources=[SourceConfig(kind="jsonl", path=str(folder / "items.jsonl"), id_column="id")],
        table=TableConfig(uri=table_uri, mode="overwrite"),
    )
    summary = run_backfill(config)
    assert summary.embedded == len(ROWS), summary.line()
    stored = open_vectors_table(config.table).to_arrow().to_pylist()
    return {row["id"]: np.asarray(row["vector"], np.float32) for row in stored}, images


def http_item(row, images):
    item = {key: row[key] for key in ("text",) if key in row}
    if "image" in row:
        item["image"] = base64.b64encode(images[row["image"]]).decode()
    return item


def test_vectors_over_http_equal_the_backfills_stored_vectors(client, backfilled):
    stored, images = backfilled
    response = client.post("/v1/embeddings", json={"input": [http_item(row, images) for row in ROWS]})
    assert response.status_code == 200, response.text
    for row, data in zip(ROWS, response.json()["data"], strict=True):
        np.testing.assert_allclose(np.asarray(data["embedding"], np.float32), stored[row["id"]], atol=1e-5)


def test_search_on_the_backfilled_table_finds_each_item_first_with_score_one(client, backfilled):
    _, images = backfilled
    for row in ROWS:
        response = client.post("/search", json={**http_item(row, images), "top_k": 2})
        assert response.status_code == 200, response.text
        best = response.json()["data"][0]
        assert best["id"] == row["id"] and best["score"] == pytest.approx(1.0, abs=1e-5)
