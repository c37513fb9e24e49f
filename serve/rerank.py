"""The ingress's rerank half: (query, document) pairs prepared here, scored by the `RerankModel` deployment.

`POST /rerank` takes the shape TEI, Infinity and Cohere users know (`query`, `documents`, `top_n`,
`return_documents`) and answers `results` of `index` and `relevance_score` (in [0, 1]), best first. `POST
/search` with `rerank: true` hands the vector search's candidates to the same path (`pipelines.rerank_search`).
Queries and documents are checked by `serve.inputs` like any input (images inline only), then prepared on the
ingress's thread pool (prompt, images, tokens: `pipelines.reranker.RerankPreparer`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from pipelines.items import ItemError
from serve.errors import ApiError, answered_within, item_error, raise_forward_errors


class RerankClient:
    """Prepares pairs and sends them to the reranker replicas through `handle` (a `RerankModel` handle)."""

    def __init__(self, reranker_config, handle, serve_config, prepare_pool):
        from pipelines.reranker import build_rerank_preparer

        self.config = reranker_config
        self.preparer = build_rerank_preparer(reranker_config)
        self.handle = handle
        self.serve_config = serve_config
        self.model_name = reranker_config.model
        self._prepare_pool = prepare_pool

    async def score(
        self, query: Any, documents: list[Any], fields: list[str], instruction: str | None
    ) -> tuple[np.ndarray, int]:
        """Scores `[n]` of checked documents against a checked query, and the pairs' token count; 422 naming
        the bad query or document, 503 as for embeddings."""
        loop = asyncio.get_running_loop()
        config = self.serve_config
        async with answered_within(config.request_timeout_s, config.retry_after_s, "reranking"):
            pairs = await loop.run_in_executor(
                self._prepare_pool, self._prepare, query, documents, fields, instruction
            )
            rows = await self.handle.score.remote(pairs)
        raise_forward_errors(rows.errors, fields)
        return np.asarray(rows.values, np.float32), sum(p.num_tokens for p in pairs)

    async def try_score(
        self, query: Any, documents: list[Any], instruction: str | None
    ) -> tuple[dict[int, float], dict[int, str], int]:
        """Scores by document position where they can be made, and why the others cannot (a bad document
        does not fail the others: /search's candidates come from the table, not from the client)."""
        loop = asyncio.get_running_loop()
        config = self.serve_config
        async with answered_within(config.request_timeout_s, config.retry_after_s, "reranking"):
            pairs, indices, errors = await loop.run_in_executor(
                self._prepare_pool, self._try_prepare, query, documents, instruction
            )
            rows = await self.handle.score.remote(pairs) if pairs else None
        scored = {}
        for position, index in enumerate(indices):
            if position in rows.errors:
                errors[index] = rows.errors[position]
            else:
                scored[index] = float(rows.values[position])
        return scored, errors, sum(p.num_tokens for p in pairs)

    def _prepare(self, query, documents, fields, instruction) -> list[Any]:
        pairs, _, errors = self._pairs(query, documents, instruction)
        if errors:
            first = errors[0]
            raise item_error(first, fields[first.index], documents[first.index])
        return pairs

    def _try_prepare(self, query, documents, instruction):
        pairs, indices, errors = self._pairs(query, documents, instruction)
        return pairs, indices, {e.index: f"{e.kind}: {e.reason}" for e in errors}

    def _pairs(self, query, documents, instruction):
        try:
            return self.preparer.pairs(query, documents, instruction)
        except ItemError as exc:  # the query itself
            raise item_error(exc, "query", query) from exc


def rerank_response(
    scores: np.ndarray,
    documents: list[Any],
    top_n: int | None,
    return_documents: bool,
    model: str,
    tokens: int,
) -> dict[str, Any]:
    """The /rerank body: results best first (ties keep the input order), the first `top_n`."""
    order = np.argsort(-scores, kind="stable")[: top_n or len(scores)]
    results = []
    for index in order:
        result: dict[str, Any] = {"index": int(index), "relevance_score": float(scores[index])}
        if return_documents:
            result["document"] = documents[index]
        results.append(result)
    return {
        "object": "rerank",
        "model": model,
        "results": results,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def no_reranker() -> ApiError:
    return ApiError(
        404,
        "this server has no reranker: add a `reranker:` section (e.g. model: Qwen/Qwen3-VL-Reranker-2B) to its "
        "config",
        param="rerank",
        code="reranker_not_configured",
    )
