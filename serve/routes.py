"""The HTTP routes, built per replica around its `EmbeddingService`.

Bodies are read with a size bound and parsed here (not by FastAPI's model binding), so that every refusal
is ours: 413 for an oversized body, 400 for malformed JSON, 422 naming the field for wrong types and bad
values, 401 without the API key. Every response is recorded in `ServeMetrics` by endpoint and status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from pipelines import __version__
from serve.auth import check_api_key
from serve.errors import ApiError, from_validation_error
from serve.inputs import input_fields, parse_inputs, parse_item
from serve.rerank import no_reranker, rerank_response
from serve.schemas import (
    EmbeddingRequest,
    RerankRequest,
    SearchRequest,
    embedding_response,
    json_bytes,
    models_response,
)

logger = logging.getLogger("ray.serve")
ENDPOINTS = ("/v1/embeddings", "/search", "/rerank", "/v1/chat/completions", "/healthz", "/v1/models")


class FastJSONResponse(JSONResponse):
    """JSON written by orjson (`serve.schemas.json_bytes`): vectors go out as float32 straight from numpy."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def build_api(service) -> FastAPI:
    """A FastAPI app whose routes call `service` (an `EmbeddingService` replica)."""
    from pipelines.pooling import matryoshka

    api = FastAPI(title="vlm-embed", version=__version__, description="Qwen3-VL embeddings and search.")
    api.add_middleware(RequestMetrics, metrics=service.metrics)
    config = service.serve_config

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        error = ApiError(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
        return JSONResponse(error.body(), status_code=422)

    @api.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.error("request to %s failed", request.url.path, exc_info=exc)
        error = ApiError(500, f"internal error ({type(exc).__name__}); the replica's log has the details")
        return JSONResponse(error.body(), status_code=500)

    def authorize(request: Request) -> None:
        check_api_key(service.api_key, request.headers.get("authorization"), request.headers.get("x-api-key"))

    def check_model(model: str | None) -> None:
        if model is not None and model not in {service.model_name, service.config.embedder.model}:
            raise ApiError(
                404,
                f"model {model!r} is not served here; this server embeds with {service.model_name!r}",
                param="model",
                code="model_not_found",
            )

    @api.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        """OpenAI-compatible embeddings; inputs may also be {text, image, instruction} items."""
        authorize(request)
        body = await read_json(request, config.max_body_bytes)
        req = validate(EmbeddingRequest, body)
        check_model(req.model)
        if req.dimensions is not None and req.dimensions > service.dimension:
            raise ApiError(
                422,
                f"dimensions={req.dimensions} is larger than the model's {service.dimension}",
                param="dimensions",
                code="invalid_value",
            )
        items = parse_inputs(req.input, service.limits)
        vectors, tokens = await service.embed(items, input_fields(req.input), query=req.input_type == "query")
        vectors = matryoshka(vectors, req.dimensions, service.normalize)
        return FastJSONResponse(embedding_response(vectors, req.encoding_format, service.model_name, tokens))

    @api.post("/search")
    async def search(request: Request) -> JSONResponse:
        """The nearest rows of the configured table to a text and/or image query."""
        authorize(request)
        body = await read_json(request, config.max_body_bytes)
        req = validate(SearchRequest, body)
        check_model(req.model)
        if req.top_k > config.max_top_k:
            raise ApiError(
                422,
                f"top_k={req.top_k} is over the limit of {config.max_top_k}",
                param="top_k",
                code="invalid_value",
            )
        query = {
            key: getattr(req, key)
            for key in ("text", "image", "instruction")
            if getattr(req, key) is not None
        }
        item = parse_item(query, service.limits, "")
        candidates = rerank_candidates(req) if req.rerank else req.top_k
        plan = await asyncio.to_thread(service.search_table.plan)
        service.search_table.check_filter(plan, req.filter)
        service.search_table.check_mode(plan, req.mode, req.text, req.image)
        vector, tokens = None, 0
        if req.mode != "text":  # a full-text search embeds nothing
            vectors, tokens = await service.embed([item], [""], query=True)
            vector = matryoshka(vectors, plan.dimension, service.normalize)[0]
        rows = await asyncio.to_thread(
            service.search_table.search, plan, vector, candidates, req.filter, req.mode, req.text
        )
        if req.rerank:
            rows, rerank_tokens = await rerank_rows(item, rows, req)
            tokens += rerank_tokens
        return FastJSONResponse(
            {
                "object": "list",
                "data": rows,
                "model": service.model_name,
                "table": service.config.table.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def rerank_candidates(req: SearchRequest) -> int:
        if service.reranker is None:
            raise no_reranker()
        limit = config.max_items_per_request
        if req.rerank_candidates is not None and req.rerank_candidates > limit:
            raise ApiError(
                422,
                f"rerank_candidates={req.rerank_candidates} is over the limit of {limit} (max_items_per_request)",
                param="rerank_candidates",
                code="invalid_value",
            )
        return min(limit, max(req.top_k, req.rerank_candidates or config.rerank_candidates))

    async def rerank_rows(query: Any, rows: list[dict[str, Any]], req: SearchRequest):
        from pipelines.rerank_search import Candidates

        candidates = await asyncio.to_thread(Candidates.of, rows)
        query = {key: value for key, value in query.items() if key != "instruction"}
        scores, failed, tokens = await service.reranker.try_score(
            query, candidates.documents, req.rerank_instruction
        )
        return candidates.ranked(scores, failed, req.top_k), tokens

    @api.post("/rerank")
    async def rerank(request: Request) -> JSONResponse:
        """Relevance scores of documents to a query, best first (the reranker's deployment)."""
        authorize(request)
        if service.reranker is None:
            raise no_reranker()
        body = await read_json(request, config.max_body_bytes)
        req = validate(RerankRequest, body)
        if req.model is not None and req.model != service.reranker.model_name:
            raise ApiError(
                404,
                f"model {req.model!r} is not served here; this server reranks with "
                f"{service.reranker.model_name!r}",
                param="model",
                code="model_not_found",
            )
        query = parse_item(req.query, service.limits, "query")
        documents = parse_inputs(req.documents, service.limits, "documents")
        fields = input_fields(req.documents, "documents")
        scores, tokens = await service.reranker.score(query, documents, fields, req.instruction)
        echoed = [req.documents] if isinstance(req.documents, str) else req.documents
        return FastJSONResponse(
            rerank_response(
                scores, echoed, req.top_n, req.return_documents, service.reranker.model_name, tokens
            )
        )

    from serve.chat import add_chat_route

    add_chat_route(api, service, authorize, check_model)

    @api.get("/healthz")
    async def healthz() -> JSONResponse:
        """200 once the model is loaded and warmed up (no API key needed), else 503."""
        health = await service.health()
        return JSONResponse(health, status_code=200 if health["status"] == "ok" else 503)

    @api.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        names = [service.model_name] + ([service.reranker.model_name] if service.reranker is not None else [])
        return JSONResponse(models_response(names, service.created))

    return api


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object: 415 unless sent as application/json, 413 past `limit` bytes (before reading
    it all), 400 if not JSON."""
    check_json_content_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(
            400, "the request body is empty; send a JSON object", param="body", code="invalid_json"
        )
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise ApiError(
            400, f"the request body is not UTF-8 JSON ({exc.reason})", param="body", code="invalid_json"
        ) from exc
    except json.JSONDecodeError as exc:
        raise ApiError(
            400,
            f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            param="body",
            code="invalid_json",
        ) from exc
    except RecursionError as exc:  # json's decoder recurses once per level of nesting
        raise ApiError(
            400, "the request body's JSON is nested too deeply", param="body", code="invalid_json"
        ) from exc
    if not isinstance(body, dict):
        raise ApiError(422, "the request body must be a JSON object", param="body", code="invalid_type")
    return body


def check_json_content_type(value: str | None) -> None:
    """415 unless the body is declared `application/json` (a `charset`, if any, must be UTF-8).

    A web page may send a cross-origin POST without a preflight only as text/plain, form-encoded or untyped;
    refusing those keeps any page a browser visits from driving a server on 127.0.0.1 with its user's access.
    """
    if value == "application/json":  # what clients send nearly always: no header parsing needed
        return
    from email.message import Message

    header = Message()
    header["content-type"] = value or ""
    media_type = header.get_content_type() if value and "/" in value.split(";")[0] else None
    charset = header.get_param("charset")
    if media_type == "application/json" and (charset is None or str(charset).lower() in ("utf-8", "utf8")):
        return
    sent = f"Content-Type {value.strip()!r}" if value else "no Content-Type"
    raise ApiError(
        415,
        f"the request body must be sent as Content-Type: application/json (UTF-8), got {sent}",
        param="Content-Type",
        code="unsupported_media_type",
    )


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is {size:,} bytes or more, over the limit of {limit:,} (max_body_bytes)",
        param="body",
        code="body_too_large",
    )


def validate(model: type[BaseModel], body: dict[str, Any]):
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


class RequestMetrics:
    """ASGI middleware: every response's endpoint, status and latency into `ServeMetrics`."""

    def __init__(self, app, metrics):
        self.app = app
        self.metrics = metrics
        self._failed = False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._record(_endpoint(scope), status, time.perf_counter() - start)

    def _record(self, endpoint: str, status: int, latency_s: float) -> None:
        try:
            self.metrics.request(endpoint, status, latency_s)
        except Exception:  # metrics must never fail a request; say so once
            if not self._failed:
                self._failed = True
                logger.exception("recording request metrics failed")


def _endpoint(scope) -> str:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path if path in ENDPOINTS else "other"
