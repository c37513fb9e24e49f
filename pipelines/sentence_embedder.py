"""The sentence-transformers backend: a real text embedding model (e.g. all-MiniLM-L6-v2) on CPU or GPU, behind
the same contract as the Qwen3-VL `Embedder`.

`backend: sentence-transformers` in `EmbedderConfig` loads `SentenceEmbedder` (`pipelines.backends`), with
`model` a local sentence-transformers directory (one with `modules.json`) or a hub id. The work is split the
same three ways, so the backfill's CPU stage and actors and Serve's ingress and replicas use it unchanged:

- `prepare(item)` (CPU): the library's own `SentenceTransformer.preprocess` (its tokenizer, the model's query or
  document prompt, truncation at the model's `max_seq_length`) -> a `PreparedItem` holding the token ids.
- `forward(items)` (GPU): the ids padded by the tokenizer's own `pad`, then the model's own modules (transformer,
  pooling, normalisation as its `modules.json` lists them) -> `sentence_embedding`. Nothing of the pooling is
  written here.
- `finish(pooled)` (CPU): `dimensions` (Matryoshka truncation) and L2 normalisation, as the Qwen3-VL embedder.

`embed_prepared`, `try_embed_prepared` (a failing forward pass is split until the failing items are found),
`embed_batch`, `embed_queries`, `try_embed_batch` are the Qwen3-VL embedder's own methods, shared, not copied.

Text only: an item with an image is an `UnsupportedModalityError` naming the backend (a row error in a backfill,
422 in Serve). The Qwen3-VL recipe options (recipe, pooling, layer, instructions, pixel bounds, the packed
layout, quantization) are refused by `EmbedderConfig` for this backend: the model's own modules decide them.

The CPU stage and Serve's ingress hold a `SentencePreparer` (`pipelines.sentence_model`), which loads the model on the CPU: the library
ties its tokenizer and prompts to the model's transformer module (about 90 MB for MiniLM).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.batching import plan_batches
from pipelines.config import EmbedderConfig
from pipelines.embedder import Embedder
from pipelines.prepare import PreparedItem
from pipelines.sentence_model import BACKEND, SentencePreparer, load_sentence_transformer


class SentenceEmbedder:
    """A sentence-transformers model behind the Qwen3-VL embedder's contract (see the module docstring).
    Build it with `SentenceEmbedder.from_config(config)` or `load_embedder(config)`."""

    def __init__(self, model, config: EmbedderConfig):
        if config.backend != BACKEND:
            raise ValueError(f"SentenceEmbedder needs backend={BACKEND!r}, got {config.backend!r}")
        self.model = model
        self.config = config
        self.preparer = SentencePreparer(model, config)
        self.tokenizer = self.preparer.tokenizer
        self.image_processor = None
        self._width = int(model.get_embedding_dimension())
        if config.dimensions is not None and config.dimensions > self._width:
            raise ValueError(
                f"dimensions={config.dimensions} is larger than the model's embedding size {self._width}"
            )
        self._model_input_names = set(getattr(self.tokenizer, "model_input_names", ()))

    @classmethod
    def from_config(cls, config: EmbedderConfig) -> SentenceEmbedder:
        return cls(load_sentence_transformer(config), config)

    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def get_embedding_dimension(self) -> int:
        return self.config.dimensions or self._width

    # -- the three steps ---------------------------------------------------------------------------------

    def prepare(self, item: Any, index: int | None = None, *, query: bool = False) -> PreparedItem:
        """CPU: check and tokenize one text (an `ItemError` naming the item; images are refused)."""
        return self.preparer.prepare(item, index, query=query)

    def forward(self, items):
        """The model's `sentence_embedding` (its own pooling and normalisation) for one batch of prepared
        items, padded by the tokenizer."""
        import torch

        features = self.tokenizer.pad(
            {"input_ids": [np.asarray(item.input_ids).tolist() for item in items]},
            padding=True,
            return_tensors="pt",
        )
        features = dict(features)
        if "token_type_ids" in self._model_input_names and "token_type_ids" not in features:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        features = {key: value.to(self.device) for key, value in features.items()}
        features["modality"] = "text"
        with torch.inference_mode():
            return self.model(features)["sentence_embedding"]

    def finish(self, pooled) -> np.ndarray:
        """Truncate to `dimensions` (Matryoshka), L2-normalise when `normalize` (as the Qwen3-VL embedder
        finishes), copy to the host as float32."""
        from pipelines import pooling

        vectors = pooling.truncate(pooled.float(), self.config.dimensions)
        vectors = pooling.normalize(vectors) if self.config.normalize else vectors
        return vectors.cpu().numpy().astype(np.float32, copy=False)

    # -- the embedder's own conveniences, shared ----------------------------------------------------------

    def embed_prepared(self, prepared, batch_size: int | None = None) -> np.ndarray:
        """Vectors for prepared items, in their order, batched by padded-token budget and sorted by length."""
        out = np.empty((len(prepared), self.get_embedding_dimension()), np.float32)
        plan = plan_batches(
            [p.num_tokens for p in prepared],
            max_tokens=self.config.max_batch_tokens,
            max_items=batch_size or self.config.max_batch_items,
            layout="padded",
        )
        for indices in plan:
            out[indices] = self.finish(self.forward([prepared[i] for i in indices]))
        return out

    try_embed_prepared = Embedder.try_embed_prepared
    embed_batch = Embedder.embed_batch
    embed_queries = Embedder.embed_queries
    embed_query = Embedder.embed_query
    try_embed_batch = Embedder.try_embed_batch
    embed_text = Embedder.embed_text
    _empty = Embedder._empty

    def embed_image(self, image: Any) -> np.ndarray:
        return self.embed_batch([{"image": image}])[0]  # refused by prepare, naming the backend

    def warm_up(self, image_side: int | None = None) -> float:
        """One short and one longer text through all three steps; returns the seconds it took."""
        import time

        start = time.perf_counter()
        self.embed_batch(["warm up", "a somewhat longer text to warm up the embedder with"])
        return time.perf_counter() - start

    def __repr__(self) -> str:
        return (
            f"SentenceEmbedder(model={self.config.model!r}, dim={self.get_embedding_dimension()}, "
            f"max_seq_length={self.preparer.max_length}, device={self.device})"
        )
