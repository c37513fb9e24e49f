"""The built-in recipes: how an item becomes a prompt string, and the defaults that go with it.

A recipe is data plus pure functions (`format_prompt`, `normalize_instruction`); nothing here imports torch
or transformers.

`qwen3-vl-embedding` is the published recipe of `Qwen/Qwen3-VL-Embedding-2B/-8B`, taken from the authors' code
(`QwenLM/Qwen3-VL-Embedding`, `src/models/qwen3_vl_embedding.py`) and report (section 2, "Embedding Method"):
the instruction as a system message, the item (image, then text) as a user message, the generation prompt, and
the tokenizer's special tokens on, which for the released checkpoints appends `<|endoftext|>`: the vector is the
last hidden state at that token. The sequence is therefore exactly

    <|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n{image}{text}<|im_end|>\\n
    <|im_start|>assistant\\n<|endoftext|>

(`end_token` makes sure of the last token whatever tokenizer is loaded: an Instruct checkpoint's adds none).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Literal, get_args

# The option lists a recipe is made of; `pipelines.config` re-exports them (config imports this module, so
# they are defined here, once).
RecipeName = Literal["instruct-mean", "qwen3-vl-embedding"]
RECIPE_NAMES: tuple[str, ...] = get_args(RecipeName)
Pooling = Literal["mean", "cls", "max", "last"]
PaddingSide = Literal["left", "right"]

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
END_OF_TEXT = "<|endoftext|>"
DEFAULT_EMBEDDING_INSTRUCTION = "Represent the user's input."
# The official README embeds queries with this task instruction and documents with the default one.
DEFAULT_QUERY_INSTRUCTION = "Retrieve images or text relevant to the user's query."
# The official reranker's default instruction (src/models/qwen3_vl_reranker.py).
DEFAULT_RERANK_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
# The official image bounds (IMAGE_FACTOR = 32: 16-pixel patches merged 2x2).
OFFICIAL_MIN_PIXELS = 4 * 32 * 32
OFFICIAL_MAX_PIXELS = 1800 * 32 * 32

_QWEN3_VL_EMBEDDING_HEAD = "<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{vision}{text}"
_QWEN3_VL_EMBEDDING_TAIL = "<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class Recipe:
    name: RecipeName
    pooling: Pooling
    layer: int
    padding_side: PaddingSide
    uses_instruction: bool
    default_instruction: str | None  # documents (the backfill, /v1/embeddings)
    default_query_instruction: str | None  # queries (search, /search, input_type=query)
    min_pixels: int
    max_pixels: int
    special_tokens: bool  # tokenize with the tokenizer's own special tokens (its post-processor) on
    end_token: str | None  # the sequence ends in exactly one of these, whatever the tokenizer adds
    tail: str  # the end of the prompt, kept whole when a long text is truncated
    # Bumped whenever the recipe computes different vectors; tables record it and refuse other versions.
    version: int
    description: str


RECIPES: dict[str, Recipe] = {
    "instruct-mean": Recipe(
        name="instruct-mean",
        pooling="mean",
        layer=-1,
        padding_side="right",
        uses_instruction=False,
        default_instruction=None,
        default_query_instruction=None,
        min_pixels=64 * 64,
        max_pixels=1280 * 32 * 32,
        special_tokens=False,
        end_token=None,
        tail="",
        version=1,
        description="A chat model reused as an encoder: the text as it is (no template, no special tokens), "
        "images as <|vision_start|><|image_pad|><|vision_end|> before the text, mean pooling.",
    ),
    "qwen3-vl-embedding": Recipe(
        name="qwen3-vl-embedding",
        pooling="last",
        layer=-1,
        padding_side="right",
        uses_instruction=True,
        default_instruction=DEFAULT_EMBEDDING_INSTRUCTION,
        default_query_instruction=DEFAULT_QUERY_INSTRUCTION,
        min_pixels=OFFICIAL_MIN_PIXELS,
        max_pixels=OFFICIAL_MAX_PIXELS,
        special_tokens=True,
        end_token=END_OF_TEXT,
        tail=_QWEN3_VL_EMBEDDING_TAIL,
        # version 1 (vlm-embed before this change) pooled the "\n" after "assistant" instead of <|endoftext|>
        version=2,
        description="The official Qwen3-VL-Embedding models: chat template with a system instruction, "
        "generation prompt, the tokenizer's <|endoftext|>, last-token pooling, Matryoshka dimensions.",
    ),
}


# What each superseded version of a recipe did differently, for the message that refuses its tables.
SUPERSEDED: dict[tuple[str, int], str] = {
    ("qwen3-vl-embedding", 1): "it pooled the '\\n' after 'assistant' instead of the official <|endoftext|>, "
    "and embedded queries without the query instruction",
}


def recipe_for_model(model: str) -> RecipeName:
    """The recipe `recipe: auto` picks: qwen3-vl-embedding for Qwen3-VL-Embedding checkpoints (by hub id or
    directory name, and the built-in `tiny-embedding`), instruct-mean for everything else."""
    name = model.rstrip("/").lower()
    if "qwen3-vl-embedding" in name or name == "tiny-embedding":
        return "qwen3-vl-embedding"
    return "instruct-mean"


def normalize_instruction(instruction: str | None) -> str | None:
    """Stripped, with a "." added unless it ends in Unicode punctuation (category P*): what the official
    `format_model_input` does to an instruction. Blank means none."""
    if instruction is None:
        return None
    instruction = instruction.strip()
    if not instruction:
        return None
    if not unicodedata.category(instruction[-1]).startswith("P"):
        instruction += "."
    return instruction


def format_prompt(
    recipe: RecipeName, text: str | None, has_image: bool, instruction: str | None = None
) -> str:
    """The prompt string for one item, with a single <|image_pad|> standing for the whole image. The
    instruction is used as given (the caller normalises it); the end token comes from tokenizing."""
    vision = IMAGE_PLACEHOLDER if has_image else ""
    text = text or ""
    if recipe == "instruct-mean":
        return vision + text
    if recipe == "qwen3-vl-embedding":
        head = _QWEN3_VL_EMBEDDING_HEAD.format(
            instruction=instruction if instruction is not None else DEFAULT_EMBEDDING_INSTRUCTION,
            vision=vision,
            text=text,
        )
        return head + _QWEN3_VL_EMBEDDING_TAIL
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
