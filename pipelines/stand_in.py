"""A pipeline-benchmark stand-in for the embedder: near-free, deterministic vectors from the token ids.

`benchmarks/scale_bench.py` measures the backfill itself (reading, preparing, moving rows, writing, resuming) at
millions of rows; with a real model the forward pass would hide all of that. `backend: stand-in` (in
`EmbedderConfig`) loads `StandInEmbedder` in place of the Qwen3-VL engine. It keeps the embedder's contract
(`prepare`, `forward`, `finish`, `embed_prepared`, `try_embed_prepared`, `embed_batch`, `embed_queries`,
`get_embedding_dimension`, `warm_up`) so the backfill's actors use it unchanged, and it leaves the CPU stage
as it is: items are still decoded and tokenized by the checkpoint's own `Preparer`, because that is part of the
pipeline being measured. Only the forward pass is replaced:

    vector = normalise(mean over tokens of T[id mod 4096] + T[digest of the pixels mod 4096] for an image)

where `T` is a fixed table of 4096 random rows (seed 0) of the vector size. So the same token ids always give
the same vector on any machine, texts that share tokens get similar vectors (a search over a stand-in table
still finds its own rows), and a batch costs well under a millisecond per item, without torch or weights.
The vector size is the checkpoint's (`loading.embedding_dimension`: `text_config.hidden_size`, or
`dimensions`), read from its `config.json`; the weights are never loaded.

The vectors mean nothing: Serve refuses this backend (`serve.app.app_for`), and it exists for benchmarks only.

Benchmark hook: with `VLM_EMBED_STAND_IN_TRACE` set to a directory, every batch `try_embed_prepared` embeds
appends one line `<unix time> <items>` to `<directory>/<pid>.trace`, so a benchmark can tell when the first row
of a run was embedded (its actors run in other processes, on other nodes). Unset, nothing is written.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pipelines.config import EmbedderConfig
from pipelines.items import BatchResult, ForwardError

TABLE_ROWS = 4096
TABLE_SEED = 0
TRACE_ENV = "VLM_EMBED_STAND_IN_TRACE"


def token_table(dimension: int) -> np.ndarray:
    """The stand-in's fixed `[TABLE_ROWS, dimension]` float32 table of random rows (the same everywhere)."""
    return np.random.default_rng(TABLE_SEED).standard_normal((TABLE_ROWS, dimension), dtype=np.float32)


class StandInEmbedder:
    """Deterministic bag-of-token-ids vectors in place of a model (see the module docstring): for measuring
    the pipeline, never for search quality. Build it with `StandInEmbedder.from_config(config)`."""

    def __init__(self, config: EmbedderConfig, hidden_size: int):
        """`hidden_size`: the checkpoint's; vectors have `config.dimensions` of it where that is set."""
        if config.backend != "stand-in":
            raise ValueError(f"StandInEmbedder needs backend='stand-in', got {config.backend!r}")
        if config.dimensions is not None and config.dimensions > hidden_size:
            raise ValueError(f"dimensions={config.dimensions} is larger than the hidden size {hidden_size}")
        self.config = config
        self.hidden_size = hidden_size
        self.dimension = config.dimensions or hidden_size
        self.table = token_table(hidden_size)
        self.device = "cpu"
        self._preparer = None
        self._trace_dir = os.environ.get(TRACE_ENV) or None

    @classmethod
    def from_config(cls, config: EmbedderConfig) -> StandInEmbedder:
        """The vector size from the checkpoint's config (no weights, no torch); the tokenizer loads on the
        first `prepare` (the backfill's actors get prepared items and never load it)."""
        from pipelines.loading import embedding_dimension

        return cls(config, embedding_dimension(config.model_copy(update={"dimensions": None})))

    # -- what the embedder offers ------------------------------------------------------------------------

    @property
    def preparer(self):
        if self._preparer is None:
            from pipelines.prepare import Preparer

            self._preparer = Preparer.load(self.config)
        return self._preparer

    @property
    def tokenizer(self):
        return self.preparer.tokenizer

    @property
    def image_processor(self):
        return self.preparer.image_processor

    def get_embedding_dimension(self) -> int:
        return self.dimension

    def prepare(self, item: Any, index: int | None = None, *, query: bool = False):
        """The checkpoint's own CPU step (template, decode, tokenize), exactly as the real embedder's."""
        return self.preparer.prepare(item, index, query=query)

    def forward(self, items: Sequence[Any]) -> np.ndarray:
        """`[n, hidden size]` float32: per item, the mean of its tokens' table rows (plus its pixels' row)."""
        out = np.empty((len(items), self.hidden_size), np.float32)
        for row, item in enumerate(items):
            ids = np.asarray(item.input_ids, np.int64)
            if ids.size == 0:
                raise ValueError("an item without tokens")
            pooled = self.table[ids % TABLE_ROWS].sum(axis=0)
            if item.pixel_values is not None:
                digest = hashlib.blake2b(np.ascontiguousarray(item.pixel_values).tobytes(), digest_size=8)
                pooled += self.table[int.from_bytes(digest.digest(), "little") % TABLE_ROWS]
            out[row] = pooled / ids.size
        return out

    def finish(self, pooled: np.ndarray) -> np.ndarray:
        """`dimensions` (Matryoshka) and L2 normalisation, as the real embedder finishes."""
        vectors = np.asarray(pooled, np.float32)
        if self.config.dimensions is not None:
            vectors = vectors[:, : self.config.dimensions]
        if self.config.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return vectors.astype(np.float32, copy=False)

    def embed_prepared(self, prepared: Sequence[Any], batch_size: int | None = None) -> np.ndarray:
        if not prepared:
            return np.empty((0, self.dimension), np.float32)
        return self.finish(self.forward(prepared))

    def try_embed_prepared(self, prepared: Sequence[Any], batch_size: int | None = None) -> BatchResult:
        """Vectors for prepared items; an item without tokens is a `ForwardError` (nothing else can fail)."""
        good, errors = [], []
        for i, item in enumerate(prepared):
            if np.asarray(item.input_ids).size:
                good.append(i)
            else:
                errors.append(ForwardError("the item has no tokens", i))
        vectors = self.embed_prepared([prepared[i] for i in good])
        self._trace(len(good))
        return BatchResult(vectors=vectors, indices=good, errors=errors)

    def embed_batch(
        self, items: Iterable[Any], batch_size: int | None = None, *, query: bool = False
    ) -> np.ndarray:
        prepared = [self.prepare(item, index, query=query) for index, item in enumerate(items)]
        result = self.try_embed_prepared(prepared, batch_size)
        if result.errors:
            raise result.errors[0]
        return result.vectors

    def embed_queries(self, items: Iterable[Any], batch_size: int | None = None) -> np.ndarray:
        return self.embed_batch(items, batch_size, query=True)

    def embed_query(self, text: str | None = None, image: Any = None) -> np.ndarray:
        item = {key: value for key, value in (("text", text), ("image", image)) if value is not None}
        return self.embed_queries([item or text])[0]

    def warm_up(self, image_side: int | None = None) -> float:
        """Nothing to compile or load: returns 0.0 seconds."""
        return 0.0

    def _trace(self, items: int) -> None:
        if self._trace_dir is None or items == 0:
            return
        os.makedirs(self._trace_dir, exist_ok=True)
        with open(os.path.join(self._trace_dir, f"{os.getpid()}.trace"), "a") as handle:
            handle.write(f"{time.time():.6f} {items}\n")

    def __repr__(self) -> str:
        return (
            f"StandInEmbedder(model={self.config.model!r}, dim={self.dimension}, pipeline-benchmark stand-in)"
        )
