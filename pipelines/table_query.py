"""Querying a vectors table in one of three modes, whatever its vectors' size and storage type.

- `vector`: nearest rows by cosine similarity (`score`), LanceDB's vector search.
- `text`: LanceDB's full-text search (BM25 over the index the backfill and `reduce` build on `text`); `score`
  is the BM25 score; no query vector is needed.
- `hybrid`: LanceDB's own hybrid query, the vector and full-text results fused by its `RRFReranker`
  (reciprocal rank fusion); `score` is the fused relevance (RRF), `vector_score` the row's cosine where the
  vector leg found it. Nothing of the fusion is written here.

The table's metadata says how its vectors are stored (`pipelines.storage`) and whether they were reduced
(`pipelines.reduce`): a query vector is projected with the table's PCA before searching, the same way
for every caller (CLI, Python, Serve, `retrieve_context`). int8 tables, which LanceDB 0.40 cannot search,
are scanned exactly here (LanceDB applies the filter, numpy computes the cosines) and fused for hybrid by the
same `RRFReranker.rerank_hybrid` LanceDB's hybrid query calls.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np

SearchMode = Literal["vector", "text", "hybrid"]
SEARCH_MODES: tuple[SearchMode, ...] = ("vector", "text", "hybrid")
BASE_WANTED = ("id", "modality", "text", "image_uri")


class SearchModeError(ValueError):
    """A query that the asked mode cannot run (no text for a text search, no full-text index, ...)."""


def check_mode(mode: str, text: str | None, image: Any = None) -> None:
    """Refuse what a mode cannot search, before any model is loaded: `text` needs a text and no image (it
    would be ignored); `hybrid` needs a text (its full-text leg), an image may join it in the vector leg."""
    if mode not in SEARCH_MODES:
        raise SearchModeError(f"mode must be one of {', '.join(SEARCH_MODES)}, not {mode!r}")
    if mode == "text" and image is not None:
        raise SearchModeError(
            "mode 'text' is a full-text search and cannot search with an image: use mode 'vector'"
        )
    if mode != "vector" and (text is None or not text.strip()):
        what = "an image query" if image is not None else "a query without text"
        raise SearchModeError(
            f"mode {mode!r} needs a query text for the full-text index; {what} needs mode 'vector'"
        )


def needs_vector(mode: str) -> bool:
    return mode != "text"


def has_text_index(table) -> bool:
    return any(
        index.index_type == "FTS" and list(index.columns) == ["text"] for index in table.list_indices()
    )


def _recorded(table) -> dict[str, Any]:
    """What the table records about its vectors; nothing for a table vlm-embed did not write (plain float32)."""
    from pipelines.table import METADATA_KEY

    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw is not None else {}


def query_vector(table, vector: np.ndarray) -> np.ndarray:
    """The query as the table stores its vectors: projected by its PCA when it was reduced with one."""
    reduction = _recorded(table).get("reduction") or {}
    vector = np.asarray(vector, np.float32)
    if reduction.get("method") != "pca":
        return vector
    from pipelines.reduce import load_projection

    return load_projection(table._conn, reduction).apply(vector)[0]


def search_rows(
    table,
    vector: np.ndarray | None,
    text: str | None = None,
    *,
    mode: SearchMode = "vector",
    top_k: int = 10,
    where: str | None = None,
    columns: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The `top_k` best rows for the mode, as dicts with `id`, `score`, `modality`, `text`, `image_uri`
    and any extra `columns`. `vector` is the query as the embedder computed it (projected here)."""
    from pipelines.filters import check_filter
    from pipelines.storage import recorded_storage

    if top_k < 1:
        raise ValueError("top_k must be at least 1")
    check_mode(mode, text)
    if where:
        where = check_filter(where, table.schema.names)
    wanted = [*BASE_WANTED, *(c for c in columns or [] if c not in BASE_WANTED)]
    if mode != "vector" and not has_text_index(table):
        raise SearchModeError(
            f"table {table.name!r} has no full-text index on 'text', which mode {mode!r} needs "
            "(the backfill builds one unless table.fts_index is false)"
        )
    if mode == "text":
        query = table.search(text, query_type="fts", fts_columns="text")
        if where:
            query = query.where(where, prefilter=True)
        rows = query.select([*wanted, "_score"]).limit(top_k).to_list()
        return [_row(row, wanted, score=float(row["_score"])) for row in rows]
    if vector is None:
        raise ValueError(f"mode {mode!r} needs a query vector")
    vector = query_vector(table, vector)
    storage, scale = recorded_storage(_recorded(table))
    if storage == "int8":
        return _int8_search(table, vector, text, mode, top_k, where, wanted, scale)
    if mode == "vector":
        query = table.search(vector, vector_column_name="vector").distance_type("cosine")
        if where:
            query = query.where(where, prefilter=True)
        # refine_factor re-ranks the candidates of an approximate (IVF-PQ) index by their exact distances
        rows = query.select([*wanted, "_distance"]).refine_factor(10).limit(top_k).to_list()
        return [_row(row, wanted, score=1.0 - float(row["_distance"])) for row in rows]
    from lancedb.rerankers import RRFReranker

    query = (
        table.search(query_type="hybrid", vector_column_name="vector", fts_columns="text")
        .vector(vector)
        .text(text)
        .distance_type("cosine")
    )
    if where:
        query = query.where(where, prefilter=True)
    rows = query.select(wanted).rerank(RRFReranker(return_score="all")).limit(top_k).to_list()
    return [_hybrid_row(row, wanted) for row in rows]


def _row(row: dict[str, Any], wanted: list[str], **extra: Any) -> dict[str, Any]:
    return {**{key: row.get(key) for key in wanted}, **extra}


def _hybrid_row(row: dict[str, Any], wanted: list[str]) -> dict[str, Any]:
    distance = row.get("_distance")
    cosine = None if distance is None or np.isnan(distance) else 1.0 - float(distance)
    return _row(row, wanted, score=float(row["_relevance_score"]), vector_score=cosine)


def _int8_search(table, vector, text, mode, top_k, where, wanted, scale) -> list[dict[str, Any]]:
    """Exact cosine over the decoded int8 codes of the rows the filter keeps; hybrid: fused with LanceDB's
    full-text results by its RRF reranker, as its hybrid query would."""
    import pyarrow as pa

    from pipelines.storage import decode

    scan = table.search().with_row_id(True).limit(None)
    if where:
        scan = scan.where(where)
    rows = scan.select([*wanted, "vector"]).to_arrow()
    if rows.num_rows == 0:
        return []
    stored = decode(rows["vector"], "int8", scale)
    norms = np.linalg.norm(stored, axis=1) * max(float(np.linalg.norm(vector)), 1e-12)
    cosine = (stored @ vector) / np.where(norms > 0, norms, 1.0)
    best = np.argsort(-cosine, kind="stable")[:top_k]
    found = rows.drop(["vector"]).take(pa.array(best))
    found = found.append_column("_distance", pa.array(1.0 - cosine[best], pa.float32()))
    if mode == "vector":
        return [_row(row, wanted, score=1.0 - float(row["_distance"])) for row in found.to_pylist()]
    from lancedb.rerankers import RRFReranker

    fts = table.search(text, query_type="fts", fts_columns="text").with_row_id(True)
    if where:
        fts = fts.where(where, prefilter=True)
    fts_rows = fts.select([*wanted, "_score"]).limit(top_k).to_arrow()
    fused = RRFReranker(return_score="all").rerank_hybrid(text, found, fts_rows)
    return [_hybrid_row(row, wanted) for row in fused.slice(0, top_k).to_pylist()]
