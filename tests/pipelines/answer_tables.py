"""Small vectors tables for the answer tests, written through the backfill's sink with an embedder's vectors."""

from __future__ import annotations

from typing import Any

from pipelines.config import TableConfig
from tests.pipelines.sink_rows import write_rows

PASSAGES = {
    "t-circle": "A red circle is a round shape with no corners.",
    "t-square": "A blue square has four equal sides and four right angles.",
    "t-star": "The yellow star has five points.",
    "t-sky": "At night the sky over the sea is dark and full of stars.",
}


def write_table(uri: str, embedder, items: dict[str, Any]) -> TableConfig:
    """`items` by id (a text, or {"text", "image": a file path}) embedded by `embedder` into a table at `uri`."""
    vectors = embedder.embed_batch(list(items.values()))
    texts = [v if isinstance(v, str) else v.get("text") for v in items.values()]
    images = [None if isinstance(v, str) else v.get("image") for v in items.values()]
    modality = [
        "text+image" if t is not None and i is not None else ("image" if i is not None else "text")
        for t, i in zip(texts, images, strict=True)
    ]
    config = TableConfig(uri=uri)
    write_rows(
        config,
        embedder.config,
        vectors,
        {"id": list(items), "text": texts, "image_uri": images, "modality": modality},
    )
    return config
