"""The vectors table's contract: its schema, the embedder configuration it records, and searching it.

Every vectors table records (in its Arrow schema metadata) the embedder configuration its vectors were made
with. Appending with, or querying through, a different configuration is refused with a clear error, so a
query is always embedded the way the corpus was.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipelines.config import EmbedderConfig, TableConfig
from pipelines.recipes import RECIPES, SUPERSEDED

METADATA_KEY = b"vlm_embed"
FORMAT_VERSION = 1
BASE_COLUMNS = ("id", "modality", "text", "image_uri", "vector")
ERRORS_COLUMNS = ("id", "source", "stage", "reason")
# Options that change how vectors are computed are in `EmbedderConfig.signature()`; these only change where
# and how fast (padding: vectors are padding-invariant), or which inputs are accepted (the image-size bound),
# so a query may use its own. Every EmbedderConfig field is in one of the two (tests/pipelines/test_config.py).
RUNTIME_OPTIONS = (
    "device",
    "dtype",
    "attn_implementation",
    "quantization",
    "fp8_keep",  # like quantization: which matmuls run in FP8 (recorded in the table's embedder config)
    "max_batch_tokens",
    "max_batch_items",
    "attention_layout",
    "varlen_attention",
    "compile",
    "padding_side",
    "max_image_pixels",
    "engine",
    "cuda_graphs",
    "compile_cache",
)


class TableConfigMismatch(ValueError):
    """The table was built with a different embedder configuration than the one asked to use it."""


class TableNotFound(LookupError):
    """No vectors table at the given URI and name."""


def vectors_schema(embedder_config: EmbedderConfig, dimension: int, kept: list | tuple = ()):
    """`id`, `modality`, `text`, `image_uri`, `vector` (fixed-size float32) and kept columns, with metadata."""
    import pyarrow as pa

    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("modality", pa.string()),
        pa.field("text", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field("vector", pa.list_(pa.float32(), dimension)),
        *kept,
    ]
    metadata = {METADATA_KEY: json.dumps(table_metadata(embedder_config, dimension), sort_keys=True).encode()}
    return pa.schema(fields, metadata=metadata)


def errors_schema():
    import pyarrow as pa

    return pa.schema([pa.field(name, pa.string()) for name in ERRORS_COLUMNS])


def table_metadata(embedder_config: EmbedderConfig, dimension: int) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "embedder": embedder_config.model_dump(mode="json"),
        "signature": embedder_config.signature(),
        "recipe_version": embedder_config.recipe_version,
        "dimension": dimension,
    }


def connect(table_config: TableConfig):
    import lancedb

    return lancedb.connect(table_config.uri, storage_options=table_config.storage_options or None)


def open_vectors_table(table_config: TableConfig):
    """The vectors table, or `TableNotFound` with the URI and name in the message."""
    db = connect(table_config)
    try:
        return db.open_table(table_config.name)
    except (FileNotFoundError, ValueError) as exc:
        raise TableNotFound(f"no table {table_config.name!r} at {table_config.uri}") from exc


def recorded_metadata(table) -> dict[str, Any]:
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise TableConfigMismatch(
            f"table {table.name!r} records no embedder configuration: was it made by vlm-embed?"
        )
    return json.loads(raw)


def check_recipe_version(table, recorded: dict[str, Any]) -> None:
    """Refuse a table whose recipe version is not the one this code computes (tables made before versions
    were recorded are version 1): its vectors and new ones would not be comparable. Backends without recipes
    (sentence-transformers: the model's own modules) have no version to check."""
    if "recipe" not in recorded["signature"]:
        return
    recipe = recorded["signature"]["recipe"]
    theirs = recorded.get("recipe_version", 1)
    mine = RECIPES[recipe].version if recipe in RECIPES else None
    if theirs == mine:
        return
    what = SUPERSEDED.get((recipe, theirs), "it computes different vectors")
    raise TableConfigMismatch(
        f"table {table.name!r} was embedded with version {theirs} of the {recipe!r} recipe, and this vlm-embed "
        f"computes version {mine} ({what}): its vectors would not be comparable with new ones. Embed the table "
        "again (vlm-embed backfill --mode overwrite, same sources)"
    )


def recorded_embedder_config(table, **runtime: Any) -> EmbedderConfig:
    """The embedder configuration the table was built with; `runtime` options (device, dtype, ...) may differ.
    A table of another recipe version is refused (`check_recipe_version`)."""
    unknown = set(runtime) - set(RUNTIME_OPTIONS)
    if unknown:
        raise ValueError(f"only runtime options may be changed for a query, not {sorted(unknown)}")
    metadata = recorded_metadata(table)
    check_recipe_version(table, metadata)
    recorded = metadata["embedder"]
    return EmbedderConfig.model_validate({**recorded, **{k: v for k, v in runtime.items() if v is not None}})


def check_matches(table, embedder_config: EmbedderConfig, dimension: int) -> None:
    """Raise `TableConfigMismatch` naming every option that differs from what the table records, or when the
    table's recipe version is not this code's."""
    recorded = recorded_metadata(table)
    check_recipe_version(table, recorded)
    mine = {**embedder_config.signature(), "dimension": dimension}
    # tables made before backends existed were all computed by transformers
    theirs = {"backend": "transformers", **recorded["signature"], "dimension": recorded["dimension"]}
    differences = {
        key: (theirs.get(key), mine.get(key))
        for key in sorted(set(mine) | set(theirs))
        if theirs.get(key) != mine.get(key)
    }
    if differences:
        listed = ", ".join(f"{key}: table has {a!r}, asked for {b!r}" for key, (a, b) in differences.items())
        raise TableConfigMismatch(
            f"table {table.name!r} was embedded with a different configuration ({listed})"
        )


def search_table(
    table,
    vector: np.ndarray | None,
    top_k: int = 10,
    where: str | None = None,
    columns: list[str] | None = None,
    *,
    mode: str = "vector",
    text: str | None = None,
) -> list[dict[str, Any]]:
    """The `top_k` best rows: dicts with `id`, `score`, `modality`, `text`, `image_uri` and any extra
    `columns`. `mode` vector (cosine `score`), text (full-text, BM25 `score`; needs `text`) or hybrid (both,
    fused by LanceDB's RRF reranker); reduced and int8 tables are handled (`pipelines.table_query`). `where`
    must be one SQL condition on the table's columns (`pipelines.filters.check_filter`, else `FilterError`):
    LanceDB would silently drop what follows one."""
    from pipelines.table_query import search_rows

    return search_rows(table, vector, text, mode=mode, top_k=top_k, where=where, columns=columns)
