"""Search, then rerank: the vector search's candidates scored again by the reranker, best first.

Retrieval users rerank the top 50-100 of a vector search (the official README reports large gains from it).
The candidates' documents are what the table holds: a row's text, and its image read from `image_uri` (a
local path or an object-store URI). A row with neither (an image that was stored only as bytes in its source)
or whose image can no longer be read cannot be reranked: it keeps its vector order after the reranked rows,
with `rerank_score` null and `rerank_error` saying why. Every row keeps its cosine `score`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_CANDIDATES = 50


def candidates_for(top_k: int, rerank_candidates: int | None) -> int:
    """How many rows the vector search returns for the reranker: at least `top_k`."""
    return max(top_k, rerank_candidates or DEFAULT_CANDIDATES)


def row_document(row: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(the reranker's document for a table row: its text and/or image, or None with the reason why not)."""
    from pipelines.items import ItemError
    from pipelines.readers import is_uri, read_image_uri

    document: dict[str, Any] = {}
    if row.get("text") is not None:
        document["text"] = row["text"]
    uri = row.get("image_uri")
    if uri is not None:
        try:  # a local path is read by the preparer (which names it if it cannot)
            document["image"] = read_image_uri(uri) if is_uri(uri) else uri
        except ItemError as exc:
            return None, f"{exc.kind}: {exc.reason}"
    if not document:
        return None, "the row has no text and no image_uri to rerank (an image stored as bytes in its source)"
    return document, None


@dataclass
class Candidates:
    """Search rows and the documents of those that can be reranked (`positions`: each document's row)."""

    rows: Sequence[dict[str, Any]]
    documents: list[dict[str, Any]]
    positions: list[int]
    errors: dict[int, str]  # by row: why it has no document

    @classmethod
    def of(cls, rows: Sequence[dict[str, Any]]) -> Candidates:
        documents, positions, errors = [], [], {}
        for i, row in enumerate(rows):
            document, error = row_document(row)
            if document is None:
                errors[i] = error
            else:
                documents.append(document)
                positions.append(i)
        return cls(rows, documents, positions, errors)

    def ranked(self, scores: dict[int, float], failed: dict[int, str], top_k: int) -> list[dict[str, Any]]:
        """The rows with `rerank_score`, given the scores (and failures) by document index: reranked rows
        first by score (ties keep the vector order), then the rows that could not be reranked, in vector
        order; the first `top_k`."""
        by_row = {self.positions[d]: score for d, score in scores.items()}
        errors = {**self.errors, **{self.positions[d]: reason for d, reason in failed.items()}}
        order = sorted(by_row, key=lambda i: (-by_row[i], i))
        order += [i for i in range(len(self.rows)) if i not in by_row]
        out = []
        for i in order[:top_k]:
            row = {**self.rows[i], "rerank_score": by_row.get(i)}
            if i not in by_row:
                row["rerank_error"] = errors.get(i, "not reranked")
            out.append(row)
        return out


def rerank_rows(
    reranker, query: dict[str, Any], rows: Sequence[dict[str, Any]], top_k: int, instruction=None
):
    """Rerank search rows in this process with a loaded `pipelines.reranker.Reranker`."""
    candidates = Candidates.of(rows)
    result = reranker.try_score(query, candidates.documents, instruction)
    scores = {d: float(s) for d, s in zip(result.indices, result.scores, strict=True)}
    return candidates.ranked(scores, {e.index: f"{e.kind}: {e.reason}" for e in result.errors}, top_k)
