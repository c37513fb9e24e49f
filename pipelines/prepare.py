"""The CPU half of embedding: prompt template, image decoding and resizing, tokenization, position ids.

`Preparer.prepare(item)` turns one item into a `PreparedItem` of numpy arrays. It needs the tokenizer and the
image processor but not the model, so it runs wherever the CPU work is cheapest (a Ray Data CPU stage, a Serve
replica's thread) and never touches the GPU. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.items import (
    ImageDecodeError,
    Item,
    ItemError,
    TooLongError,
    load_image,
    parse_item,
)
from pipelines.recipes import IMAGE_PAD, RECIPES, format_prompt, normalize_instruction


@dataclass
class PreparedItem:
    """One item, ready for the model: token ids, M-RoPE positions and (for images) patches.

    In a backfill's blocks a list of them travels as Arrow columns (`pipelines.prepared_arrow`, built on
    `to_row`/`from_row`)."""

    input_ids: np.ndarray  # int64 [n]
    position_ids: np.ndarray  # int64 [3, n]
    pixel_values: np.ndarray | None = None  # float32 [patches, channels * temporal * patch * patch]
    image_grid_thw: np.ndarray | None = None  # int64 [3] (one image) or [images, 3]
    modality: str = "text"
    truncated: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_patches(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])

    @property
    def image_grids(self) -> np.ndarray:
        """`[images, 3]`: one (t, h, w) row per image, in order (none: `[0, 3]`)."""
        if self.image_grid_thw is None:
            return np.zeros((0, 3), np.int64)
        return np.asarray(self.image_grid_thw, np.int64).reshape(-1, 3)

    def to_row(self) -> dict[str, Any]:
        """A flat dict of numpy arrays and scalars (one row of `prepared_arrow.prepared_table`; pickling)."""
        has_image = self.pixel_values is not None
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids.reshape(-1),
            "pixel_values": self.pixel_values.reshape(-1) if has_image else np.zeros(0, np.float32),
            "pixel_shape": np.asarray(self.pixel_values.shape if has_image else (0, 0), np.int64),
            "image_grid_thw": self.image_grid_thw.reshape(-1) if has_image else np.zeros(3, np.int64),
            "modality": self.modality,
            "truncated": self.truncated,
            "num_tokens": self.num_tokens,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> PreparedItem:
        input_ids = np.asarray(row["input_ids"], np.int64)
        pixel_shape = tuple(int(x) for x in np.asarray(row["pixel_shape"]))
        has_image = pixel_shape[0] > 0
        return cls(
            input_ids=input_ids,
            position_ids=np.asarray(row["position_ids"], np.int64).reshape(3, -1),
            pixel_values=np.asarray(row["pixel_values"], np.float32).reshape(pixel_shape)
            if has_image
            else None,
            image_grid_thw=_grid(np.asarray(row["image_grid_thw"], np.int64)) if has_image else None,
            modality=str(row["modality"]),
            truncated=bool(row["truncated"]),
        )


def _grid(flat: np.ndarray) -> np.ndarray:
    return flat if flat.shape[0] == 3 else flat.reshape(-1, 3)


def mrope_position_ids(
    input_ids: np.ndarray, image_token_id: int, grid_thw: np.ndarray | None, merge: int
) -> np.ndarray:
    """Qwen3-VL's 3-D (temporal, height, width) positions for one unpadded sequence with its images, in order
    (`grid_thw`: `[3]` for one image, `[images, 3]` for several).

    Text tokens advance all three axes together; an image's tokens take a grid of positions starting where
    the text left off, and the text after it resumes at start + max(grid height, grid width).
    """
    n = input_ids.shape[0]
    is_image = input_ids == image_token_id
    grids = np.zeros((0, 3), np.int64) if grid_thw is None else np.asarray(grid_thw).reshape(-1, 3)
    positions = np.empty((3, n), np.int64)
    cursor, next_position = 0, 0  # the next token to place, and the position the next text token takes
    for _, h, w in grids:
        gh, gw = int(h // merge), int(w // merge)
        count = gh * gw
        first = cursor + int(np.argmax(is_image[cursor:])) if is_image[cursor:].any() else n
        if not is_image[first : first + count].all() or first + count > n:
            raise ValueError("image tokens must form contiguous blocks matching the image grids")
        positions[:, cursor:first] = next_position + np.arange(first - cursor)
        start = next_position + first - cursor
        positions[0, first : first + count] = start
        positions[1, first : first + count] = start + np.repeat(np.arange(gh), gw)
        positions[2, first : first + count] = start + np.tile(np.arange(gw), gh)
        cursor, next_position = first + count, start + max(gh, gw)
    if is_image[cursor:].any():
        raise ValueError("image tokens must form contiguous blocks matching the image grids")
    positions[:, cursor:] = next_position + np.arange(n - cursor)
    return positions


class Preparer:
    """Turns items into `PreparedItem`s with one recipe's prompt format and one model's tokenizer and images.

    Token ids are what the tokenizer gives for the whole prompt with the recipe's special-token setting (for
    qwen3-vl-embedding: on, as the official code tokenizes), ending in exactly one `end_token` where the recipe
    has one. A sequence over `max_length` loses non-special tokens from the end of its head (the item's text)
    while every special token is kept (the official `_truncate_tokens` rule) and the prompt's tail is kept
    whole, so the template and the final token survive. The prompt is tokenized with one `<|image_pad|>` that
    is then repeated once per merged image patch, as the processor does; image tokens are special, never cut.
    """

    def __init__(
        self,
        tokenizer,
        image_processor,
        *,
        recipe: str,
        instruction: str | None,
        min_pixels: int,
        max_pixels: int,
        max_image_pixels: int,
        max_length: int,
        query_instruction: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.recipe = recipe
        self.instruction = instruction
        self.query_instruction = query_instruction
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_image_pixels = max_image_pixels
        self.max_length = max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.merge_size = int(image_processor.merge_size) if image_processor is not None else 2
        spec = RECIPES[recipe]
        self._prefix, self._suffix = special_tokens_added(tokenizer) if spec.special_tokens else ([], [])
        if spec.end_token is not None:
            end = known_token_id(tokenizer, spec.end_token)
            if not self._suffix or self._suffix[-1] != end:
                self._suffix = [*self._suffix, end]
        tail = self._encode(spec.tail) if spec.tail else []
        self._kept_tail = len(tail) + len(self._suffix)
        self._special_ids = {*tokenizer.all_special_ids, self.image_token_id}

    @classmethod
    def for_config(cls, config, tokenizer, image_processor) -> Preparer:
        """The preparer of an `EmbedderConfig`: what the embedder uses, and what CPU stages build without weights."""
        return cls(
            tokenizer,
            image_processor,
            recipe=config.recipe,
            instruction=config.resolved_instruction,
            query_instruction=config.resolved_query_instruction,
            min_pixels=config.resolved_min_pixels,
            max_pixels=config.resolved_max_pixels,
            max_image_pixels=config.max_image_pixels,
            max_length=config.max_length,
        )

    @classmethod
    def load(cls, config) -> Preparer:
        """The same preparer an `Embedder` of `config` builds, from the checkpoint's tokenizer and image
        processor only (no weights): what CPU stages and Serve's ingress use."""
        from pipelines.loading import load_processor_parts, resolve_model_source

        tokenizer, image_processor = load_processor_parts(resolve_model_source(config.model))
        return cls.for_config(config, tokenizer, image_processor)

    def prepare(self, item: Any, index: int | None = None, *, query: bool = False) -> PreparedItem:
        """Check, decode and tokenize one item; `query`: with the query instruction instead of the document
        one (an item's own instruction wins over both). Raises an `ItemError` naming the item if it is bad."""
        item = parse_item(item, index)
        pixel_values = grid = None
        if item.image is not None:
            pixel_values, grid = self._image_patches(item, index)
        instruction = self.instruction_for(item, query)
        ids = self._tokenize(item.text, pixel_values is not None, instruction, grid)
        truncated = len(ids) > self.max_length
        if truncated:
            ids = self._truncate(ids, item, instruction, grid, index)
        return PreparedItem(
            input_ids=ids,
            position_ids=mrope_position_ids(ids, self.image_token_id, grid, self.merge_size),
            pixel_values=pixel_values,
            image_grid_thw=grid,
            modality=item.modality,
            truncated=truncated,
        )

    def instruction_for(self, item: Item, query: bool = False) -> str | None:
        """The instruction an item is embedded with, as it enters the prompt."""
        if item.instruction is not None:
            return normalize_instruction(item.instruction)
        return self.query_instruction if query else self.instruction

    def prompt(self, item: Item, query: bool = False) -> str:
        """The prompt string of an item, with a single <|image_pad|> standing for its image."""
        return format_prompt(
            self.recipe, item.text, item.image is not None, self.instruction_for(item, query)
        )

    def _encode(self, text: str) -> list[int]:
        """The text's token ids, no special tokens added. A fast tokenizer's Rust backend is called directly
        (`backend_tokenizer.encode`, what `tokenizer(...)` ends in, without its per-call Python: ~1/3 of a short
        text's CPU cost); `encode_special_tokens` is set as the wrapper would set it. Otherwise the wrapper,
        verbose=False: no "longer than the maximum sequence length" warning for texts we truncate."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        split = bool(getattr(self.tokenizer, "split_special_tokens", False))
        if backend.encode_special_tokens != split:
            backend.encode_special_tokens = split
        return backend.encode(text, add_special_tokens=False).ids

    def _tokenize(self, text: str | None, has_image: bool, instruction: str | None, grid) -> np.ndarray:
        prompt = format_prompt(self.recipe, text, has_image, instruction)
        ids = np.asarray([*self._prefix, *self._encode(prompt), *self._suffix], np.int64)
        return expand_image_tokens(ids, self.image_token_id, grid, self.merge_size) if has_image else ids

    def _truncate(
        self, ids: np.ndarray, item: Item, instruction: str | None, grid, index: int | None
    ) -> np.ndarray:
        """Drop the item's own text tokens from the end (never the template, its tail or the image)."""
        fixed = len(self._tokenize(None, item.image is not None, instruction, grid))
        if fixed > self.max_length:
            raise TooLongError(
                f"the prompt without its text already takes {fixed} tokens, over max_length={self.max_length}",
                index,
            )
        cut = len(ids) - self._kept_tail
        head = keep_special_tokens_truncate(ids[:cut], self.max_length - self._kept_tail, self._special_ids)
        return np.concatenate([head, ids[cut:]])

    def _image_patches(self, item: Item, index: int | None) -> tuple[np.ndarray, np.ndarray]:
        return image_patches(
            self.image_processor, item.image, self.min_pixels, self.max_pixels, self.max_image_pixels, index
        )


def image_patches(
    image_processor, source: Any, min_pixels: int, max_pixels: int, max_image_pixels: int, index: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(pixel patches `[patches, D]`, grid `[3]`) of one image source, resized to multiples of 32 within the
    pixel bounds as the official preprocessing resizes it."""
    if image_processor is None:
        raise ItemError("this model was loaded without an image processor and cannot take images", index)
    image = load_image(source, max_image_pixels, index)
    try:
        out = image_processor(
            images=[image],
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
            return_tensors="np",
        )
    except ValueError as exc:  # e.g. an aspect ratio over 200:1
        raise ImageDecodeError(f"cannot process image {image.width}x{image.height}: {exc}", index) from exc
    pixel_values = np.asarray(out["pixel_values"], np.float32)
    grid = np.asarray(out["image_grid_thw"], np.int64).reshape(-1)[:3]
    return pixel_values, grid


def expand_image_tokens(ids: np.ndarray, image_token_id: int, grids, merge: int) -> np.ndarray:
    """Repeat each `<|image_pad|>` once per merged patch of its image (`grids`: `[3]` or `[images, 3]`), as
    the processor expands the prompt's image placeholders."""
    grids = np.asarray(grids).reshape(-1, 3)
    at = np.flatnonzero(ids == image_token_id)
    if len(at) != len(grids):
        raise ValueError(f"{len(at)} image placeholders for {len(grids)} images")
    parts, start = [], 0
    for position, grid in zip(at, grids, strict=True):
        parts += [ids[start:position], np.full(int(np.prod(grid)) // merge**2, image_token_id, np.int64)]
        start = position + 1
    return np.concatenate([*parts, ids[start:]])


def keep_special_tokens_truncate(ids: np.ndarray, max_length: int, special_ids: set[int]) -> np.ndarray:
    """The official `_truncate_tokens` rule: keep every special token, and the first non-special ones up to
    `max_length` in all; the others (the end of the text) are dropped."""
    if len(ids) <= max_length:
        return ids
    special = np.isin(ids, np.fromiter(special_ids, np.int64))
    budget = max(0, max_length - int(special.sum()))
    keep = special | (np.cumsum(~special) <= budget)
    return ids[keep]


def special_tokens_added(tokenizer) -> tuple[list[int], list[int]]:
    """The tokens a tokenizer puts before and after a sequence when special tokens are on (its
    post-processor: none for Qwen3-VL Instruct checkpoints, <|endoftext|> after it for the embedding ones)."""
    probe = "a"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare) :])
    raise ValueError("cannot tell which special tokens this tokenizer adds around a sequence")


def known_token_id(tokenizer, token: str) -> int:
    """The id of a token the tokenizer must have in its vocabulary."""
    token_id = tokenizer.get_vocab().get(token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {token} token: is it a Qwen3-VL tokenizer?")
    return int(token_id)
