"""The built-in recipes: how an item becomes a prompt string, and the pooling defaults that go with it.

A recipe is data plus one pure function (`format_prompt`); nothing here imports torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RecipeName = Literal["instruct-mean", "qwen3-vl-embedding"]

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
DEFAULT_EMBEDDING_INSTRUCTION = "Represent the user's input."

# The reference format of the official Qwen3-VL-Embedding models (chat template, add_generation_prompt=True).
_QWEN3_VL_EMBEDDING_FORMAT = (
    "<|im_start|>system\n{instruction}<|im_end|>\n"
    "<|im_start|>user\n{vision}{text}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@dataclass(frozen=True)
class Recipe:
    name: RecipeName
    pooling: Literal["mean", "cls", "max", "last"]
    layer: int
    padding_side: Literal["left", "right"]
    uses_instruction: bool
    default_instruction: str | None
    description: str


RECIPES: dict[str, Recipe] = {
    "instruct-mean": Recipe(
        name="instruct-mean",
        pooling="mean",
        layer=-1,
        padding_side="right",
        uses_instruction=False,
        default_instruction=None,
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
        description="The official Qwen3-VL-Embedding models: chat template with a system instruction, "
        "generation prompt, last-token pooling, Matryoshka dimensions.",
    ),
}


def format_prompt(
    recipe: RecipeName, text: str | None, has_image: bool, instruction: str | None = None
) -> str:
    """The prompt string for one item, with a single <|image_pad|> standing for the whole image."""
    vision = IMAGE_PLACEHOLDER if has_image else ""
    text = text or ""
    if recipe == "instruct-mean":
        return vision + text
    if recipe == "qwen3-vl-embedding":
        return _QWEN3_VL_EMBEDDING_FORMAT.format(
            instruction=instruction if instruction is not None else DEFAULT_EMBEDDING_INSTRUCTION,
            vision=vision,
            text=text,
        )
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
