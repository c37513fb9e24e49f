"""The light half of the sentence-transformers backend (`pipelines.sentence_embedder`): which model, its vector
size from its module configs (no torch), loading it, and `SentencePreparer`, the CPU step the backfill's CPU stage
and Serve's ingress run. Importing this module imports neither torch nor sentence-transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import TINY_MODELS, EmbedderConfig
from pipelines.items import ItemError, parse_item
from pipelines.loading import ModelLoadError, resolve_device, resolve_dtype
from pipelines.prepare import PreparedItem

BACKEND = "sentence-transformers"
_NO_POSITIONS = np.zeros((3, 0), np.int64)  # position ids are the model's own business here


class UnsupportedModalityError(ItemError):
    """An item this backend cannot embed (an image, for a text-only model)."""

    kind = "unsupported_modality"


def resolve_sentence_model(model: str) -> str:
    """A local sentence-transformers directory (it must hold `modules.json`) as an absolute path, or a hub id
    as it is."""
    if model in TINY_MODELS:
        raise ModelLoadError(
            f"{model!r} is a built-in Qwen3-VL checkpoint; the {BACKEND} backend needs a sentence-transformers "
            "model: a directory with modules.json or a hub id"
        )
    path = Path(model).expanduser()
    if model.startswith(("/", "./", "../", "~")) or path.exists():
        if not (path / "modules.json").is_file():
            raise ModelLoadError(f"{model}: not a sentence-transformers model directory (no modules.json)")
        return str(path.resolve())
    return model


def load_sentence_transformer(config: EmbedderConfig, device: str | None = None):
    """The `SentenceTransformer` of `config` in eval mode without gradients, on `device` (default: the
    config's), refused where this backend cannot run it as prepared items (a Router, or pooling that leaves
    the prompt out while the model has one)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ModelLoadError(
            f"the {BACKEND} backend needs the sentence-transformers package: pip install 'vlm-embed[sentence]'"
        ) from exc
    source = resolve_sentence_model(config.model)
    device = resolve_device(device or config.device)
    model_kwargs: dict[str, Any] = {"dtype": resolve_dtype(config.dtype, device)}
    if config.attn_implementation != "sdpa":  # sdpa is transformers' own default where a model has it
        model_kwargs["attn_implementation"] = config.attn_implementation
    try:
        model = SentenceTransformer(source, device=device, model_kwargs=model_kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"cannot load the sentence-transformers model {config.model!r}: {exc}") from exc
    model.eval().requires_grad_(False)
    names = [type(module).__name__ for module in model]
    if "Router" in names:
        raise ModelLoadError(f"{config.model!r} routes queries and documents apart (Router): not supported")
    pooling = next((m for m in model if type(m).__name__ == "Pooling"), None)
    prompts = {k: v for k, v in (model.prompts or {}).items() if v}
    if pooling is not None and not getattr(pooling, "include_prompt", True) and prompts:
        raise ModelLoadError(
            f"{config.model!r} pools without its prompt tokens (include_prompt=False): not supported"
        )
    if not model.max_seq_length:
        raise ModelLoadError(f"{config.model!r} names no max_seq_length")
    return model


class SentencePreparer:
    """The CPU step of this backend: one item -> a `PreparedItem` of token ids, through the library's own
    `preprocess` with the model's document or query prompt."""

    def __init__(self, model, config: EmbedderConfig):
        self.model = model
        self.config = config
        self.tokenizer = model.tokenizer
        self.image_processor = None
        self.max_length = min(int(model.max_seq_length), config.max_length)
        if self.max_length != model.max_seq_length:
            model.max_seq_length = self.max_length
        prompts = model.prompts or {}
        default = prompts.get(model.default_prompt_name) if model.default_prompt_name else None
        # as encode_document / encode_query pick them: the named prompt where the model has one
        self.document_prompt = prompts.get("document", default) or None
        self.query_prompt = prompts.get("query", default) or None

    @classmethod
    def load(cls, config: EmbedderConfig) -> SentencePreparer:
        """A preparer with its own CPU copy of the model (what the backfill's CPU stage and Serve's ingress
        use: the forward pass runs elsewhere)."""
        return cls(load_sentence_transformer(config, device="cpu"), config)

    def prepare(self, item: Any, index: int | None = None, *, query: bool = False) -> PreparedItem:
        parsed = parse_item(item, index)
        if parsed.image is not None:
            raise UnsupportedModalityError(
                f"the {BACKEND} backend ({self.config.model}) embeds texts only; this item has an image",
                index,
                "image",
            )
        if parsed.instruction is not None:
            raise UnsupportedModalityError(
                f"the {BACKEND} backend takes no per-item instruction (the model's own prompts apply)",
                index,
                "instruction",
            )
        prompt = self.query_prompt if query else self.document_prompt
        features = self.model.preprocess([parsed.text], prompt=prompt)
        ids = features["input_ids"][0].numpy().astype(np.int64)
        token_types = features.get("token_type_ids")
        if token_types is not None and bool(token_types.any()):
            raise ItemError("the tokenizer gave token type ids other than 0 for a single text", index)
        return PreparedItem(
            input_ids=ids,
            position_ids=_NO_POSITIONS,
            modality="text",
            truncated=len(ids) >= self.max_length and self._longer_than_limit(parsed.text, prompt),
        )

    def _longer_than_limit(self, text: str, prompt: str | None) -> bool:
        full = self.tokenizer((prompt or "") + text, truncation=False, verbose=False)["input_ids"]
        return len(full) > self.max_length


# -- the vector size without the weights -------------------------------------------------------------------


def sentence_embedding_dimension(config: EmbedderConfig) -> int:
    """The vector size of a sentence-transformers config: read from a local model's module configs where they
    say it plainly (the backfill's driver and Serve's ingress then import no torch), else from the loaded
    model; checked against `dimensions`."""
    source = resolve_sentence_model(config.model)
    width = _width_from_module_configs(Path(source))
    if width is None:
        width = int(load_sentence_transformer(config, device="cpu").get_embedding_dimension())
    if config.dimensions is not None and config.dimensions > width:
        raise ValueError(f"dimensions={config.dimensions} is larger than the model's embedding size {width}")
    return config.dimensions or width


def _width_from_module_configs(directory: Path) -> int | None:
    """The output width of a chain of Transformer -> Pooling (one mode) -> Dense* -> Normalize modules, from
    `modules.json` and the modules' `config.json`; None for anything else (the model is then loaded)."""
    try:
        modules = json.loads((directory / "modules.json").read_text())
        width = None
        for module in modules:
            kind = module["type"].rsplit(".", 1)[-1]
            path = directory / module.get("path", "")
            if kind == "Transformer":
                continue
            if kind == "Normalize":
                continue
            settings = json.loads((path / "config.json").read_text())
            if kind == "Pooling":
                modes = [k for k, v in settings.items() if k.startswith("pooling_mode_") and v is True]
                if len(modes) != 1:
                    return None
                width = settings.get("word_embedding_dimension") or settings.get("embedding_dimension")
            elif kind == "Dense":
                width = settings["out_features"]
            else:
                return None
        return width if isinstance(width, int) and width > 0 else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
