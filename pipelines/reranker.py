"""The reranker: Qwen3-VL-Reranker's relevance score of (query, document) pairs, the second stage of retrieval.

The official recipe (`QwenLM/Qwen3-VL-Embedding`, `src/models/qwen3_vl_reranker.py`, and the report's section 2,
"Reranking Method") is a pointwise cross-encoder: one sequence per pair,

    <|im_start|>system\\nJudge whether the Document meets the requirements based on the Query and the Instruct
    provided. Note that the answer can only be "yes" or "no".<|im_end|>\\n<|im_start|>user\\n<Instruct>:
    {instruction}<Query>:{query image}{query text}\\n<Document>:{document image}{document text}<|im_end|>\\n
    <|im_start|>assistant\\n

tokenized with the tokenizer's special tokens on, and scored from the last position's hidden state h (after the
final norm) as sigmoid((W_yes - W_no) . h), W being the LM head's rows of the "yes" and "no" tokens: the
probability of "yes" against "no" as the next token. Only those two rows are kept, not the LM head. A pair
whose tokens (all but the template's tail, the last 5 tokens in Qwen's tokenizer) exceed `max_length` loses
non-special tokens from the end (the official truncation), so it may run over by that tail.

It knows nothing about Ray and shares the embedder's split: `prepare` (CPU: prompt, images, tokens),
`forward` (GPU: the base model to the last layer, the last token of each pair) and `finish` (the score), and
the embedder's engine (padded or packed layout, token-budget batches) runs the forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.config import EmbedderConfig, RerankerConfig
from pipelines.items import BatchResult, InvalidItemError, Item, ItemError, TooLongError, parse_item
from pipelines.prepare import (
    PreparedItem,
    expand_image_tokens,
    image_patches,
    keep_special_tokens_truncate,
    known_token_id,
    mrope_position_ids,
    special_tokens_added,
)
from pipelines.recipes import IMAGE_PAD, IMAGE_PLACEHOLDER

RERANK_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
# The official code truncates all but the last 5 tokens: this tail, in Qwen's tokenizer.
TAIL = "<|im_end|>\n<|im_start|>assistant\n"


def pair_prompt(instruction: str, query: Item, document: Item) -> str:
    """The pair's prompt with one <|image_pad|> per image, exactly as the official chat template renders it."""
    return (
        f"<|im_start|>system\n{RERANK_SYSTEM}<|im_end|>\n<|im_start|>user\n"
        f"<Instruct>: {instruction}<Query>:{_content(query)}\n<Document>:{_content(document)}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def _content(item: Item) -> str:
    content = (IMAGE_PLACEHOLDER if item.image is not None else "") + (item.text or "")
    return content or "NULL"


@dataclass(frozen=True)
class _Side:
    """A query or a document, checked and with its image decoded into patches (once per query)."""

    item: Item
    pixel_values: np.ndarray | None
    grid: np.ndarray | None


class RerankPreparer:
    """Turns (query, document) pairs into `PreparedItem`s: the official prompt, tokens and images."""

    def __init__(self, tokenizer, image_processor, config: RerankerConfig):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.merge_size = int(image_processor.merge_size) if image_processor is not None else 2
        self._prefix, self._suffix = special_tokens_added(tokenizer)
        self._special_ids = {*tokenizer.all_special_ids, self.image_token_id}
        tail = tokenizer(TAIL, add_special_tokens=False)["input_ids"]
        self.kept_tail = len(tail) + len(self._suffix)
        self.yes_id, self.no_id = known_token_id(tokenizer, "yes"), known_token_id(tokenizer, "no")

    def side(self, value: Any, role: str, index: int | None = None) -> _Side:
        """Check a query or a document (a string, or a dict with `text` and/or `image`) and decode its image."""
        item = parse_item(value, index)
        if item.instruction is not None:
            raise InvalidItemError(
                f"a {role} takes no 'instruction'; the instruction belongs to the pair", index, "instruction"
            )
        if item.image is None:
            return _Side(item, None, None)
        c = self.config
        pixels, grid = image_patches(
            self.image_processor,
            item.image,
            c.resolved_min_pixels,
            c.resolved_max_pixels,
            c.max_image_pixels,
            index,
        )
        return _Side(item, pixels, grid)

    def prepare(
        self, query: Any, document: Any, index: int | None = None, instruction: str | None = None
    ) -> PreparedItem:
        """One pair, ready for the model; raises an `ItemError` naming the document if it is bad."""
        return self.pair(
            self.side(query, "query"), self.side(document, "document", index), instruction, index
        )

    def pairs(
        self, query: Any, documents: Sequence[Any], instruction: str | None = None
    ) -> tuple[list[PreparedItem], list[int], list[ItemError]]:
        """(the pairs of the documents that can be prepared, their indices, an error for each other); the
        query is decoded once, and a bad query raises (no document can be paired with it)."""
        side = self.side(query, "query")
        pairs, indices, errors = [], [], []
        for i, document in enumerate(documents):
            try:
                pairs.append(self.pair(side, self.side(document, "document", i), instruction, i))
                indices.append(i)
            except ItemError as exc:
                errors.append(exc if exc.index == i else exc.at(i))
        return pairs, indices, errors

    def pair(self, query: _Side, document: _Side, instruction: str | None, index: int | None) -> PreparedItem:
        instruction = instruction if instruction and instruction.strip() else self.config.resolved_instruction
        prompt = pair_prompt(instruction, query.item, document.item)
        encoded = self.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        ids = np.asarray([*self._prefix, *encoded, *self._suffix], np.int64)
        sides = [side for side in (query, document) if side.pixel_values is not None]
        grids = np.stack([side.grid for side in sides]) if sides else None
        if grids is not None:
            ids = expand_image_tokens(ids, self.image_token_id, grids, self.merge_size)
        body, tail = ids[: -self.kept_tail], ids[-self.kept_tail :]
        truncated = len(body) > self.config.max_length
        if truncated:
            body = keep_special_tokens_truncate(body, self.config.max_length, self._special_ids)
            if len(body) > self.config.max_length:
                raise TooLongError(
                    f"the pair's images and template alone take {len(body) + len(tail)} tokens, over "
                    f"max_length={self.config.max_length}",
                    index,
                )
            ids = np.concatenate([body, tail])
        return PreparedItem(
            input_ids=ids,
            position_ids=mrope_position_ids(ids, self.image_token_id, grids, self.merge_size),
            pixel_values=np.concatenate([side.pixel_values for side in sides]) if sides else None,
            image_grid_thw=grids,
            modality=document.item.modality,
            truncated=truncated,
        )


def build_rerank_preparer(config: RerankerConfig) -> RerankPreparer:
    """The reranker's CPU half from the tokenizer and image processor only (no weights): Serve's ingress."""
    from pipelines.loading import load_processor_parts, resolve_model_source

    tokenizer, image_processor = load_processor_parts(resolve_model_source(config.model))
    return RerankPreparer(tokenizer, image_processor, config)


@dataclass(frozen=True)
class RerankResult:
    """One document's place after reranking: its index in the input, its score in [0, 1]."""

    index: int
    score: float


@dataclass
class RerankScores(BatchResult):
    """Scores for the documents that worked (`indices` says which) and an error for each that did not: an
    embedder's `BatchResult` whose rows are scores."""

    @property
    def scores(self) -> np.ndarray:
        return self.vectors


class Reranker:
    """A Qwen3-VL-Reranker checkpoint. Build it with `Reranker.load(...)` or from a loaded generation model."""

    def __init__(
        self,
        model: Any,
        processor: Any = None,
        *,
        image_processor: Any = None,
        config: RerankerConfig | None = None,
    ):
        """Wrap an already loaded generation model (`Qwen3VLForConditionalGeneration`: the score needs its LM
        head's "yes" and "no" rows) and its processor (or a bare tokenizer, for text only)."""
        import torch

        from pipelines.embedder import Embedder
        from pipelines.loading import ModelLoadError, split_processor

        head = getattr(model, "lm_head", None)
        if head is None:
            raise ModelLoadError(
                f"the reranker needs the LM head: pass the generation model "
                f"(Qwen3VLForConditionalGeneration), not {type(model).__name__}"
            )
        if processor is None:
            raise ModelLoadError("a processor (or tokenizer) is needed next to the model")
        tokenizer, own_image_processor = split_processor(processor)
        image_processor = image_processor if image_processor is not None else own_image_processor
        self.config = config or RerankerConfig(
            model=getattr(model.config, "_name_or_path", "") or "in-memory"
        )
        self.preparer = RerankPreparer(tokenizer, image_processor, self.config)
        weight = head.weight
        with torch.no_grad():
            self._direction = (weight[self.preparer.yes_id] - weight[self.preparer.no_id]).float().clone()
        runtime = self.config.model_dump(exclude={"instruction"})
        engine_config = EmbedderConfig(
            **runtime, recipe="instruct-mean", pooling="last", layer=-1, normalize=False
        )
        # the embedder's engine runs the base model; its own preparer is not used
        self._engine = Embedder(model, tokenizer, image_processor=image_processor, config=engine_config)

    @classmethod
    def load(cls, model: str = "tiny-reranker", **options: Any) -> Reranker:
        """Load from a hub id, a local checkpoint directory or 'tiny-reranker'; options are `RerankerConfig`
        fields."""
        return cls.from_config(RerankerConfig(model=model, **options))

    @classmethod
    def from_config(cls, config: RerankerConfig) -> Reranker:
        from pipelines.loading import load_checkpoint

        model, tokenizer, image_processor = load_checkpoint(config, lm_head=True)
        # the generation wrapper and its LM head go once this returns: only the two rows are kept
        return cls(model, tokenizer, image_processor=image_processor, config=config)

    @property
    def device(self):
        return self._engine.device

    @property
    def image_processor(self):
        return self.preparer.image_processor

    # -- the three steps ---------------------------------------------------------------------------------

    def prepare(
        self, query: Any, document: Any, index: int | None = None, instruction: str | None = None
    ) -> PreparedItem:
        """CPU: one (query, document) pair's prompt, images and tokens."""
        return self.preparer.prepare(query, document, index, instruction)

    def forward(self, pairs: Sequence[PreparedItem]):
        """GPU: the last position's hidden state of each pair (float32, on the model's device)."""
        return self._engine.forward(pairs)

    def finish(self, hidden) -> np.ndarray:
        """The score of each pair: sigmoid((W_yes - W_no) . h), float32 in [0, 1]."""
        import torch

        logits = hidden.float() @ self._direction.to(hidden.device)
        return torch.sigmoid(logits).cpu().numpy().astype(np.float32, copy=False)

    # -- conveniences ------------------------------------------------------------------------------------

    def score_prepared(self, pairs: Sequence[PreparedItem]) -> np.ndarray:
        """Scores of prepared pairs, in their order, batched by token budget like the embedder's items."""
        import torch

        if not pairs:
            return np.empty(0, np.float32)
        hidden = self._engine.embed_prepared(pairs)  # the last tokens' states, as vectors (not normalised)
        return self.finish(torch.from_numpy(hidden))

    def try_score_prepared(self, pairs: Sequence[PreparedItem]) -> RerankScores:
        """Like `score_prepared`, but a pair the model cannot score is a `ForwardError` (the embedder's
        isolation: a failing forward pass is split until the failing pairs are found)."""
        import torch

        result = self._engine.try_embed_prepared(pairs)
        scores = self.finish(torch.from_numpy(result.vectors)) if result.indices else np.empty(0, np.float32)
        return RerankScores(scores, result.indices, result.errors)

    def score(self, query: Any, documents: Sequence[Any], instruction: str | None = None) -> np.ndarray:
        """The relevance score in [0, 1] of each document to the query; raises an `ItemError` on the first bad
        input (a `ForwardError` for a pair the model cannot score)."""
        result = self.try_score(query, documents, instruction)
        if result.errors:
            raise result.errors[0]
        return result.scores

    def try_score(self, query: Any, documents: Sequence[Any], instruction: str | None = None) -> RerankScores:
        """Like `score`, but a bad document comes back as an error naming it instead of raising (a bad query
        still raises: no document can be scored without it)."""
        pairs, indices, errors = self.preparer.pairs(query, documents, instruction)
        scored = self.try_score_prepared(pairs)
        errors += [e.at(indices[e.index]) for e in scored.errors]
        kept = [indices[i] for i in scored.indices]
        return RerankScores(scored.scores, kept, sorted(errors, key=lambda e: e.index))

    def rerank(
        self, query: Any, documents: Sequence[Any], top_n: int | None = None, instruction: str | None = None
    ) -> list[RerankResult]:
        """The documents' indices and scores, best first (ties keep the input order), the first `top_n`."""
        scores = self.score(query, documents, instruction)
        order = np.argsort(-scores, kind="stable")
        return [RerankResult(int(i), float(scores[i])) for i in order[: top_n or len(order)]]

    def warm_up(self) -> float:
        """One text pair (and one image pair, with an image processor) through all three steps."""
        import time

        from PIL import Image

        start = time.perf_counter()
        documents: list[Any] = ["warm up"]
        if self.image_processor is not None:
            documents.append({"text": "warm up", "image": Image.new("RGB", (64, 64), (128, 64, 32))})
        scores = self.score("warm up", documents)
        if not np.isfinite(scores).all():
            raise RuntimeError("the warm-up pairs gave non-finite scores: the model is broken")
        return time.perf_counter() - start

    def __repr__(self) -> str:
        return f"Reranker(model={self.config.model!r}, device={self.device}, dtype={self._engine.dtype})"
