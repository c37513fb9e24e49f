"""Request bodies (validated, unknown keys refused) and response bodies of the HTTP API.

`/v1/embeddings` follows OpenAI's embeddings API, so OpenAI clients work unchanged; its `input` is checked by
`serve.inputs` (it may also hold multimodal items). Base64 vectors are little-endian float32, as OpenAI's.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

EncodingFormat = Literal["float", "base64"]
InputType = Literal["document", "query"]
SearchMode = Literal["vector", "text", "hybrid"]  # pipelines.table_query.SEARCH_MODES


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbeddingRequest(_Request):
    """POST /v1/embeddings."""

    input: Any = Field(
        description="A string, a list of strings, or a list mixing strings and {text, image, instruction} items."
    )
    model: StrictStr | None = Field(default=None, description="The served model's name (see /v1/models).")
    dimensions: StrictInt | None = Field(default=None, ge=1, description="Keep the first D dimensions.")
    encoding_format: EncodingFormat = Field(default="float", description="float, or base64 (float32 LE).")
    input_type: InputType = Field(
        default="document",
        description="document: embedded with the document instruction (what the backfill stores); query: with "
        "the query instruction, for searching such vectors (qwen3-vl-embedding). An item's own instruction wins.",
    )
    user: StrictStr | None = Field(default=None, description="Accepted for OpenAI compatibility; unused.")


class SearchRequest(_Request):
    """POST /search: a text and/or an image query against the configured vectors table."""

    text: StrictStr | None = Field(default=None, description="The query text.")
    image: StrictStr | None = Field(default=None, description="The query image: base64 or a data URL.")
    instruction: StrictStr | None = Field(
        default=None,
        description="The query's instruction instead of the table's query instruction (qwen3-vl-embedding).",
    )
    top_k: StrictInt = Field(default=10, ge=1, description="How many rows to return.")
    mode: SearchMode = Field(
        default="vector",
        description="vector: cosine similarity of the embedded query; text: the table's full-text index on "
        "text only (BM25 score, nothing embedded; needs text and takes no image); hybrid: both, fused by "
        "LanceDB's reciprocal rank fusion (score: the fused relevance, vector_score: the cosine; needs text).",
    )
    filter: StrictStr | None = Field(
        default=None,
        max_length=4096,
        description="A SQL filter on the table's columns, e.g. \"lang = 'en'\".",
    )
    model: StrictStr | None = Field(default=None, description="The served model's name, if given.")
    rerank: StrictBool = Field(
        default=False,
        description="Rerank the vector search's first rerank_candidates rows with the server's reranker and "
        "return the best top_k by its score (each row then has rerank_score).",
    )
    rerank_candidates: StrictInt | None = Field(
        default=None,
        ge=1,
        description="Rows handed to the reranker; default: the server's rerank_candidates.",
    )
    rerank_instruction: StrictStr | None = Field(default=None, description="The reranker's instruction.")


class RerankRequest(_Request):
    """POST /rerank: score documents against a query (TEI, Infinity and Cohere's request shape)."""

    query: Any = Field(description="A string, or an item {text, image}.")
    documents: Any = Field(description="A list of strings and {text, image} items.")
    top_n: StrictInt | None = Field(default=None, ge=1, description="Return only the best N results.")
    return_documents: StrictBool = Field(default=False, description="Echo each result's document.")
    instruction: StrictStr | None = Field(
        default=None,
        description="What relevance means; default: the official 'Given a search query, retrieve relevant "
        "candidates that answer the query.'",
    )
    model: StrictStr | None = Field(default=None, description="The served reranker's name, if given.")


def encode_vector(vector, encoding_format: EncodingFormat):
    """A vector as OpenAI returns it: float32 numbers (a contiguous float32 array, which `json_bytes` writes as a
    list, each number the shortest text that reads back as the same float32), or base64 of little-endian float32."""
    import numpy as np

    vector = np.ascontiguousarray(vector, dtype=np.float32)
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")
    return vector


def json_bytes(body: Any) -> bytes:
    """A response body as JSON, numpy arrays included (orjson: ~0.1 ms for a 2,048-float vector, where the
    standard library's json takes ~2.5 ms over Python floats, and 45% fewer bytes)."""
    import orjson

    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def embedding_response(
    vectors, encoding_format: EncodingFormat, model: str, prompt_tokens: int
) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": encode_vector(vector, encoding_format)}
            for index, vector in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def models_response(models: list[str], created: int) -> dict[str, Any]:
    """The served models: the embedder's name, then the reranker's where there is one."""
    return {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "created": created, "owned_by": "vlm-embed"} for model in models
        ],
    }
