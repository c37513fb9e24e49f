"""Small vectors tables for the answer tests, written through the backfill's sink with an embedder's vectors."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipelines.config import TableConfig
from pipelines.sink import BackfillSink
from pipelines.stages import output_schema

PASSAGES = {
    "t-circle": "A red circle is a round shape with no corners.",
    "t-square": "A blue square has four equal sides and four right angles.",
    "t-star": "The yellow star has five points.",
    "t-sky": "At night the sky over the sea is dark and full of stars.",
}


def write_table(uri: str, embedder, items: dict[str, Any]) -> TableConfig:
    """`items` by id (a text, or {"text", "image": a file path}) embedded by `embedder` into a table at `uri`."""
    vectors = embedder.embed_batch(list(items.values()))
    dim = embedder.get_embedding_dimension()
    texts = [v if isinstance(v, str) else v.get("text") for v in items.values()]
    images = [None if isinstance(v, str) else v.get("image") for v in items.values()]
    modality = [
        "text+image" if t is not None and i is not None else ("image" if i is not None else "text")
        for t, i in zip(texts, images, strict=True)
    ]
    n = len(items)
    schema = output_schema(dim)
    columns = {
        "id": list(items),
        "source": ["test"] * n,
        "text": texts,
        "image_uri": images,
        "kept": [None] * n,
        "status": ["ok"] * n,
        "stage": [None] * n,
        "reason": [None] * n,
        "origin": [f"0:{i}" for i in range(n)],  # the row's unit and place in it
        "modality": modality,
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
    }
    # the backfill's own columns this test does not set (their nulls are what a plain row has)
    columns.update({name: [None] * n for name in schema.names if name not in columns})
    rows = pa.table(columns, schema=schema)
    config = TableConfig(uri=uri)
    sink = BackfillSink(config, embedder.config, dim)
    sink.open()
    sink.write(rows)
    sink.close()
    return config
