"""The validated configuration objects that every entry point produces.

`EmbedderConfig` says which model to load and how an item becomes a vector. The CLI, the backfill job, the
Serve app and the cluster manifests all build one of these (from flags, YAML or a Serve config), so the
same options mean the same thing everywhere. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.recipes import RECIPES, RecipeName

Pooling = Literal["mean", "cls", "max", "last"]
PaddingSide = Literal["left", "right"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["none", "4bit", "8bit"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]

TINY_MODEL = "tiny"


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown keys and can be read from YAML."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        return cls.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class EmbedderConfig(StrictModel):
    """How to load the model and how an item becomes a vector."""

    model: str = Field(
        default=TINY_MODEL,
        description="A hub id (e.g. Qwen/Qwen3-VL-2B-Instruct), a local checkpoint directory, or 'tiny' for the "
        "built-in offline random checkpoint (built on first use).",
    )
    recipe: RecipeName = Field(default="instruct-mean", description="Prompt format and pooling defaults.")
    pooling: Pooling | None = Field(default=None, description="Pooling over tokens; default: the recipe's.")
    layer: int | None = Field(
        default=None,
        description="Index into transformers' output_hidden_states tuple (0: token embeddings, -1: last layer "
        "after the final norm); default: the recipe's. The forward pass stops after this layer.",
    )
    normalize: bool = Field(default=True, description="L2-normalise the vectors.")
    dimensions: int | None = Field(
        default=None, ge=1, description="Keep the first D dimensions (Matryoshka), then re-normalise."
    )
    instruction: str | None = Field(
        default=None, description="System instruction (qwen3-vl-embedding only); default: the recipe's."
    )
    padding_side: PaddingSide | None = Field(
        default=None, description="Batch padding side; default: the recipe's."
    )
    dtype: DType = Field(default="auto", description="auto: bfloat16 on CUDA, float32 on CPU.")
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N.")
    attn_implementation: AttnImplementation = Field(default="sdpa", description="Attention kernel.")
    quantization: Quantization = Field(default="none", description="bitsandbytes 4-bit or 8-bit weights.")
    min_pixels: int = Field(
        default=64 * 64, ge=1, description="Smaller images are upscaled to at least this."
    )
    max_pixels: int = Field(
        default=1280 * 32 * 32, ge=1, description="Larger images are downscaled to at most this many pixels."
    )
    max_image_pixels: int = Field(
        default=100_000_000,
        ge=1,
        description="Images whose decoded size exceeds this are rejected before decoding (decompression bombs).",
    )
    max_length: int = Field(
        default=8192, ge=8, description="Longest token sequence; longer texts are truncated."
    )
    max_batch_tokens: int = Field(
        default=16384, ge=1, description="Token budget of one forward pass (padded tokens count)."
    )
    max_batch_items: int = Field(default=256, ge=1, description="Most items in one forward pass.")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})")
        if self.instruction is not None and not RECIPES[self.recipe].uses_instruction:
            raise ValueError(f"recipe {self.recipe!r} takes no instruction")
        return self

    @property
    def resolved_pooling(self) -> Pooling:
        return self.pooling or RECIPES[self.recipe].pooling

    @property
    def resolved_layer(self) -> int:
        return self.layer if self.layer is not None else RECIPES[self.recipe].layer

    @property
    def resolved_padding_side(self) -> PaddingSide:
        return self.padding_side or RECIPES[self.recipe].padding_side

    @property
    def resolved_instruction(self) -> str | None:
        recipe = RECIPES[self.recipe]
        return self.instruction if self.instruction is not None else recipe.default_instruction

    def signature(self) -> dict[str, Any]:
        """What a vector depends on: stored with every table and checked before appending or querying."""
        return {
            "model": self.model,
            "recipe": self.recipe,
            "pooling": self.resolved_pooling,
            "layer": self.resolved_layer,
            "normalize": self.normalize,
            "dimensions": self.dimensions,
            "instruction": self.resolved_instruction,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "max_length": self.max_length,
        }
