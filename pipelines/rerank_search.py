"""Search, then rerank: the vector search's candidates scored again by the reranker, best first.

Retrieval users rerank the top 50-100 of a vector search (the official README reports large gains from it).
The candidates' documents are what the table holds: a row's text, and its image read from `image_uri` (a
local path or an object-store URI). A row with neither (an image that was stored only as bytes in its source)
or whose image can no longer be read cannot be reranked: it keeps its vector order after the reranked rows,
with `rerank_score` null and `rerank_error` saying why. Every row keeps its cosine `score`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT_CANDIDATES = 50


def candidates_for(top_k: int, rerank_candidates: int | None) -> int:
    """How many rows the vector search returns for the reranker: at least `top_k`."""
    return max(top_k, rerank_candidates or DEFAULT_CANDIDATES)


def row_document(row: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(the reranker's document for a table row: its text and/or image, or None with the reason why not)."""
    from pipelines.readers import is_uri

    document: dict[str, Any] = {}
    if row.get("text") is not None:
        document["text"] = row["text"]
    uri = row.get("image_uri")
    if uri is not None and is_uri(uri):
        from pyarrow import fs

        try:
            filesystem, path = fs.FileSystem.from_uri(uri)
            with filesystem.open_input_stream(path) as handle:
                document["image"] = handle.readall()
        except (OSError, ValueError) as exc:
            return None, f"image_unreadable: cannot read image {uri}: {exc}"
    elif uri is not None:
        document["image"] = uri  # a local path: the preparer reads it (and names it if it cannot)
    if not document:
        return None, "the row has no text and no image_uri to rerank (an image stored as bytes in its source)"
    return document, None


def apply_scores(
    rows: Sequence[dict[str, Any]],
    scores: dict[int, float],
    errors: dict[int, str],
    top_k: int,
) -> list[dict[str, Any]]:
    """The rows with `rerank_score` (by row position), reranked rows first by score (ties keep the vector
    order), then the rows that could not be reranked, in vector order; the first `top_k`."""
    scored = sorted(scores, key=lambda i: (-scores[i], i))
    rest = [i for i in range(len(rows)) if i not in scores]
    out = []
    for i in [*scored, *rest][:top_k]:
        row = {**rows[i], "rerank_score": scores.get(i)}
        if i not in scores:
            row["rerank_error"] = errors.get(i, "not reranked")
        out.append(row)
    return out


def rerank_rows(
    reranker, query: dict[str, Any], rows: Sequence[dict[str, Any]], top_k: int, instruction=None
):
    """Rerank search rows in this process with a loaded `pipelines.reranker.Reranker`."""
    documents, errors = documents_of(rows)
    present = sorted(documents)
    result = reranker.try_score(query, [documents[i] for i in present], instruction)
    scores = {present[j]: float(s) for j, s in zip(result.indices, result.scores, strict=True)}
    errors.update({present[e.index]: f"{e.kind}: {e.reason}" for e in result.errors})
    return apply_scores(rows, scores, errors, top_k)


def documents_of(rows: Sequence[dict[str, Any]]) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """The rows' documents by row position, and why the others have none."""
    documents, errors = {}, {}
    for i, row in enumerate(rows):
        document, error = row_document(row)
        if document is None:
            errors[i] = error
        else:
            documents[i] = document
    return documents, errors
