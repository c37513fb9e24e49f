"""The embedder: a Qwen3-VL base model plus a recipe, turning texts, images and pairs into vectors.

It knows nothing about Ray. Its work is split the way Infinity splits it, so that batch and online paths can
place each part where it belongs:
- `prepare(item)`  (CPU) prompt template, image decoding, tokenization, positions -> `PreparedItem`
- `forward(items)` (GPU) the base model up to the chosen layer, then pooling       -> pooled tensor
- `finish(pooled)` (CPU) Matryoshka truncation, L2 normalisation                    -> float32 numpy
`embed_batch` does all three with token-budget, length-sorted batches and returns results in input order.
The forward pass is the engine's (`pipelines.engine`: padded or packed layout, picked from the config); the
embedder does not ask which one runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from pipelines import pooling
from pipelines.batching import plan_batches
from pipelines.config import EmbedderConfig
from pipelines.engine import build_engine
from pipelines.forward import resolve_layer
from pipelines.items import BatchResult, ForwardError, ItemError
from pipelines.loading import (
    ModelLoadError,
    base_model_of,
    check_compatible,
    load_checkpoint,
    split_processor,
)
from pipelines.prepare import PreparedItem, Preparer


class Embedder:
    """A Qwen3-VL model and a recipe. Build it with `Embedder.load(...)` or from an already loaded model."""

    def __init__(
        self,
        model: Any,
        processor: Any = None,
        *,
        image_processor: Any = None,
        config: EmbedderConfig | None = None,
        **options: Any,
    ):
        """Wrap an already loaded model (the base `Qwen3VLModel` or the generation class, whose weights are
        shared, not copied) and its processor (or a bare tokenizer, for text only)."""
        self.model = base_model_of(model)
        if processor is None:
            raise ModelLoadError("a processor (or tokenizer) is needed next to the model")
        tokenizer, own_image_processor = split_processor(processor)
        image_processor = image_processor if image_processor is not None else own_image_processor
        if config is None:
            options.setdefault("model", getattr(self.model.config, "_name_or_path", "") or "in-memory")
            config = EmbedderConfig(**options)
        elif options:
            config = EmbedderConfig.model_validate({**config.model_dump(), **options})
        check_compatible(self.model.config, tokenizer, image_processor)
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.layer = resolve_layer(self.model, config.resolved_layer)
        self.pooling = config.resolved_pooling
        self.padding_side = config.resolved_padding_side
        hidden = self.model.config.text_config.hidden_size
        if config.dimensions is not None and config.dimensions > hidden:
            raise ValueError(
                f"dimensions={config.dimensions} is larger than the model's hidden size {hidden}"
            )
        self.pad_token_id = _pad_token_id(tokenizer, self.model.config)
        self.preparer = Preparer.for_config(config, tokenizer, image_processor)
        if config.quantization == "fp8":
            from pipelines.fp8 import conversion, convert_to_fp8

            done = conversion(self.model.language_model)
            if done is None:
                convert_to_fp8(self.model.language_model, keep=config.fp8_keep)
            elif done["keep"] != tuple(sorted(config.fp8_keep)):
                raise ValueError(
                    f"this model's layers were converted to FP8 keeping {list(done['keep'])} in bf16, and this "
                    f"embedder asks for fp8_keep={list(config.fp8_keep)}: load the model again"
                )
        self.engine = build_engine(
            self.model,
            config,
            layer=self.layer,
            pooling=self.pooling,
            pad_token_id=self.pad_token_id,
            padding_side=self.padding_side,
        )

    @classmethod
    def load(cls, model: str = "tiny", **options: Any) -> Embedder:
        """Load from a hub id, a local checkpoint directory or 'tiny'; options are `EmbedderConfig` fields."""
        return cls.from_config(EmbedderConfig(model=model, **options))

    @classmethod
    def from_config(cls, config: EmbedderConfig) -> Embedder:
        base, tokenizer, image_processor = load_checkpoint(config)
        return cls(base, tokenizer, image_processor=image_processor, config=config)

    # -- properties -------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    def get_embedding_dimension(self) -> int:
        return self.config.dimensions or self.model.config.text_config.hidden_size

    # -- the three steps ---------------------------------------------------------------------------------

    def prepare(self, item: Any, index: int | None = None, *, query: bool = False) -> PreparedItem:
        """CPU: check, decode and tokenize one item (raises an `ItemError` naming the item); `query`: with the
        recipe's query instruction instead of the document one."""
        return self.preparer.prepare(item, index, query=query)

    def forward(self, items: Sequence[PreparedItem]) -> torch.Tensor:
        """GPU: pooled hidden states (float32, on the model's device) for one batch of prepared items."""
        return self.engine.forward(items)

    def finish(self, pooled: torch.Tensor) -> np.ndarray:
        """Truncate to `dimensions`, normalise, copy to the host as float32."""
        return self._finish_on_device(pooled).cpu().numpy().astype(np.float32, copy=False)

    def _finish_on_device(self, pooled: torch.Tensor) -> torch.Tensor:
        vectors = pooling.truncate(pooled.float(), self.config.dimensions)
        return pooling.normalize(vectors) if self.config.normalize else vectors

    # -- conveniences ------------------------------------------------------------------------------------

    def embed_prepared(self, prepared: Sequence[PreparedItem], batch_size: int | None = None) -> np.ndarray:
        """Vectors for prepared items, in their order, batched by token budget and sorted by length."""
        out = np.empty((len(prepared), self.get_embedding_dimension()), np.float32)
        plan = plan_batches(
            [p.num_tokens for p in prepared],
            max_tokens=self.config.max_batch_tokens,
            max_items=batch_size or self.config.max_batch_items,
            layout=self.engine.layout,
        )
        # vectors stay on the device until the end: one copy to the host, not one per step
        steps = [[prepared[i] for i in step] for step in plan]
        vectors = [self._finish_on_device(pooled) for pooled in self.engine.forward_steps(steps)]
        if vectors:
            out[[i for step in plan for i in step]] = torch.cat(vectors).cpu().numpy()
        return out

    def try_embed_prepared(
        self, prepared: Sequence[PreparedItem], batch_size: int | None = None
    ) -> BatchResult:
        """Like `embed_prepared`, but an item the model cannot embed comes back as a `ForwardError` instead of
        failing the others: a forward pass that raises is split in halves until the failing items are found
        (the others keep their vectors), and a non-finite vector is an error. The backfill and Serve both
        embed through this, so one poisoned item costs only its own row or request."""
        vectors: dict[int, np.ndarray] = {}
        errors: list[ItemError] = []

        def run(indices: list[int]) -> None:
            try:
                out = self.embed_prepared([prepared[i] for i in indices], batch_size)
            except Exception as exc:  # noqa: BLE001 (any failure of the forward pass, out of memory included)
                if len(indices) == 1:
                    errors.append(
                        ForwardError(f"the forward pass failed: {type(exc).__name__}: {exc}", indices[0])
                    )
                    return
                half = len(indices) // 2
                run(indices[:half])
                run(indices[half:])
                return
            for i, vector, finite in zip(indices, out, np.isfinite(out).all(axis=1), strict=True):
                if finite:
                    vectors[i] = vector
                else:
                    errors.append(ForwardError("the model gave a non-finite vector", i))

        if prepared:
            run(list(range(len(prepared))))
        indices = sorted(vectors)
        stacked = np.stack([vectors[i] for i in indices]) if indices else self._empty()
        return BatchResult(vectors=stacked, indices=indices, errors=sorted(errors, key=lambda e: e.index))

    def warm_up(self, image_side: int | None = None) -> float:
        """Run a few representative steps (and compile, with `compile=True`); returns the seconds it took.

        Call it before taking work (a Serve replica, a backfill actor), so that the first request does not pay
        for compilation. `image_side`: also warm up the vision tower on such square images.
        On a GPU it also runs one full step (`max_batch_tokens`) of each kind; `compile: auto` compiles here,
        with the artifacts shared through `compile_cache` where there is one (`pipelines.compile_cache`)."""
        from pipelines.compile_cache import shared_compile_cache

        with shared_compile_cache(self.config, self.engine):
            return self.engine.warm_up(image_side=image_side, step_tokens=self.config.max_batch_tokens)

    def embed_batch(
        self, items: Iterable[Any], batch_size: int | None = None, *, query: bool = False
    ) -> np.ndarray:
        """Vectors `[n, D]` for strings or dicts with `text` and/or `image`; raises an `ItemError` on the first
        bad item (a `ForwardError` for one the model cannot embed). Documents by default; `query=True` (or
        `embed_queries`) embeds with the query instruction."""
        prepared = [self.prepare(item, index, query=query) for index, item in enumerate(items)]
        result = self.try_embed_prepared(prepared, batch_size)
        if result.errors:
            raise result.errors[0]
        return result.vectors

    def embed_queries(self, items: Iterable[Any], batch_size: int | None = None) -> np.ndarray:
        """Vectors for search queries: with the recipe's query instruction (qwen3-vl-embedding: "Retrieve images
        or text relevant to the user's query."), as the official README embeds queries."""
        return self.embed_batch(items, batch_size, query=True)

    def embed_query(self, text: str | None = None, image: Any = None) -> np.ndarray:
        """One query vector for a text, an image, or both."""
        item = {key: value for key, value in (("text", text), ("image", image)) if value is not None}
        return self.embed_queries([item or text])[0]

    def try_embed_batch(
        self, items: Iterable[Any], batch_size: int | None = None, *, query: bool = False
    ) -> BatchResult:
        """Like `embed_batch`, but bad items are returned as errors instead of raised."""
        prepared, indices, errors = [], [], []
        for index, item in enumerate(items):
            try:
                prepared.append(self.prepare(item, index, query=query))
                indices.append(index)
            except ItemError as exc:
                errors.append(exc if exc.index == index else exc.at(index))
        embedded = self.try_embed_prepared(prepared, batch_size)
        errors += [e.at(indices[e.index]) for e in embedded.errors]
        return BatchResult(
            vectors=embedded.vectors,
            indices=[indices[i] for i in embedded.indices],
            errors=sorted(errors, key=lambda e: e.index),
        )

    def embed_text(self, text: str) -> np.ndarray:
        return self.embed_batch([text])[0]

    def embed_image(self, image: Any) -> np.ndarray:
        return self.embed_batch([{"image": image}])[0]

    def embed_multimodal(self, text: str, image: Any) -> np.ndarray:
        return self.embed_batch([{"text": text, "image": image}])[0]

    def _empty(self) -> np.ndarray:
        return np.empty((0, self.get_embedding_dimension()), np.float32)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Embedder(model={c.model!r}, recipe={c.recipe!r}, pooling={self.pooling!r}, layer={self.layer}, "
            f"dim={self.get_embedding_dimension()}, device={self.device}, dtype={self.dtype})"
        )


def _pad_token_id(tokenizer, model_config) -> int:
    for candidate in (tokenizer.pad_token_id, model_config.text_config.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
