"""Loading a Qwen3-VL checkpoint (hub id or local directory) as a base model plus tokenizer and image processor.

The base model only (`Qwen3VLModel`): no LM head, no KV cache. The processor parts are loaded one by one
(`AutoTokenizer`, `AutoImageProcessor` with the PIL backend) rather than through `AutoProcessor`, which needs a
video processor and therefore torchvision, and which can quietly return a bare tokenizer when that is missing.
The PIL backend also gives the same pixels on CPU-only and GPU machines. Anything inconsistent fails loudly.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from pipelines.config import TINY_MODELS
from pipelines.recipes import IMAGE_PAD

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", IMAGE_PAD)


class ModelLoadError(RuntimeError):
    """The checkpoint, its processor or the options asked for cannot be loaded as a Qwen3-VL embedder."""


def cache_home() -> Path:
    return Path(os.environ.get("VLM_EMBED_HOME", Path.home() / ".cache" / "vlm-embed"))


def resolve_model_source(model: str) -> str:
    """'tiny', 'tiny-embedding' and 'tiny-reranker' become the built-in offline checkpoints (built on first
    use, `pipelines.tiny_model`); anything else is returned as given."""
    if model not in TINY_MODELS:
        looks_like_path = model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()
        if looks_like_path and not (Path(model).expanduser() / "config.json").exists():
            raise ModelLoadError(f"{model}: not a checkpoint directory (no config.json there)")
        return str(Path(model).expanduser()) if looks_like_path else model
    from pipelines.tiny_model import BUILD_VERSION, make_tiny_model

    flavour = TINY_MODELS[model]
    path = cache_home() / f"tiny-qwen3-vl-{flavour}-v{BUILD_VERSION}"
    if not (path / "config.json").exists():
        with contextlib.suppress(FileExistsError):  # built concurrently by another process: same files
            make_tiny_model(path, flavour=flavour)
    return str(path)


def embedding_dimension(config) -> int:
    """The vector size of an `EmbedderConfig`, from the checkpoint's config alone (no weights), checked against
    `dimensions`: what the backfill's driver and Serve's ingress need without loading the model. A local
    checkpoint's `config.json` is read as JSON where it names the size (importing transformers costs a driver
    seconds, as it imports torch); anything else goes through transformers' AutoConfig."""
    source = resolve_model_source(config.model)
    hidden = _hidden_size_from_json(Path(source) / "config.json")
    if hidden is None:
        from transformers import AutoConfig

        try:
            hidden = AutoConfig.from_pretrained(source).text_config.hidden_size
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelLoadError(f"cannot read the model config of {config.model!r}: {exc}") from exc
    if config.dimensions is not None and config.dimensions > hidden:
        raise ValueError(f"dimensions={config.dimensions} is larger than the model's hidden size {hidden}")
    return config.dimensions or hidden


def _hidden_size_from_json(path: Path) -> int | None:
    """`text_config.hidden_size` of a Qwen3-VL `config.json`, or None where the file does not say it plainly."""
    import json

    try:
        size = json.loads(path.read_text())["text_config"]["hidden_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return size if isinstance(size, int) and size > 0 else None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device={device!r} was asked for but CUDA is not available on this machine")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def base_model_of(model: Any):
    """The `Qwen3VLModel` inside a generation model (sharing its weights), or the model itself."""
    from transformers import Qwen3VLModel

    if isinstance(model, Qwen3VLModel):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, Qwen3VLModel):
        return inner
    raise ModelLoadError(
        f"expected a Qwen3-VL model (Qwen3VLModel or Qwen3VLForConditionalGeneration), got {type(model).__name__}"
    )


def load_checkpoint(options: Any, *, lm_head: bool = False) -> tuple[Any, Any, Any]:
    """(model, tokenizer, image processor) of the checkpoint `options` (an `EmbedderConfig` or a
    `RerankerConfig`) names, on its device and dtype: the base model, or with `lm_head` the generation class.
    The one loading path of the embedder, the reranker and the generator."""
    source = resolve_model_source(options.model)
    device = resolve_device(options.device)
    kwargs = {
        "dtype": resolve_dtype(options.dtype, device),
        "device": device,
        "attn_implementation": options.attn_implementation,
        "quantization": options.quantization,
    }
    model = load_model(source, **kwargs, lm_head=True) if lm_head else load_base_model(source, **kwargs)
    tokenizer, image_processor = load_processor_parts(source)
    return model, tokenizer, image_processor


def load_base_model(source: str, *, dtype, device: str, attn_implementation: str, quantization: str):
    """`AutoModel.from_pretrained` on a hub id or directory: the base model in eval mode, no gradients."""
    model = load_model(
        source,
        dtype=dtype,
        device=device,
        attn_implementation=attn_implementation,
        quantization=quantization,
        lm_head=False,
    )
    return base_model_of(model)


def load_model(
    source: str, *, dtype, device: str, attn_implementation: str, quantization: str, lm_head: bool
):
    """The checkpoint in eval mode without gradients: the base model (`AutoModel`), or with `lm_head` the
    generation class (`AutoModelForImageTextToText`, whose LM head the reranker reads its score from)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read a model config from {source!r}: {exc}") from exc
    if getattr(config, "model_type", None) not in {"qwen3_vl"}:
        raise ModelLoadError(
            f"{source!r} is a {getattr(config, 'model_type', '?')!r} model, not Qwen3-VL (qwen3_vl)"
        )
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    bitsandbytes = quantization in ("4bit", "8bit")  # fp8 converts the loaded model in the Embedder
    if bitsandbytes:
        kwargs["quantization_config"] = _bnb_config(quantization, dtype)
        kwargs["device_map"] = {"": device}
    auto = AutoModelForImageTextToText if lm_head else AutoModel
    try:
        model = auto.from_pretrained(source, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"cannot load {source!r}: {exc}") from exc
    if not bitsandbytes:
        model = model.to(device)
    return model.eval().requires_grad_(False)


def _bnb_config(quantization: str, dtype):
    from transformers import BitsAndBytesConfig

    skip = ["visual", "lm_head"]  # the vision tower is small and sensitive; keep it in full precision
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_type="nf4",
            llm_int8_skip_modules=skip,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ModelLoadError(f"unknown quantization {quantization!r}")


def load_processor_parts(source: str) -> tuple[Any, Any]:
    """(tokenizer, image processor) of a checkpoint; raises `ModelLoadError` naming what is missing."""
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {source!r}: {exc}") from exc
    try:
        image_processor = AutoImageProcessor.from_pretrained(source, backend="pil")
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"cannot load the image processor of {source!r}: {exc}") from exc
    return tokenizer, image_processor


def split_processor(processor: Any) -> tuple[Any, Any]:
    """Accept a full processor (with `.tokenizer` and `.image_processor`) or a bare tokenizer (text only)."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer, getattr(processor, "image_processor", None)
    if hasattr(processor, "convert_tokens_to_ids"):
        return processor, None
    raise ModelLoadError(f"expected a Qwen3-VL processor or tokenizer, got {type(processor).__name__}")


def check_compatible(config, tokenizer, image_processor) -> None:
    """Fail loudly when the processor does not belong to the model (wrong token ids, patch or merge size)."""
    unk = tokenizer.convert_tokens_to_ids("<|this-token-does-not-exist|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    missing = [token for token, i in ids.items() if i is None or i == unk]
    if missing:
        raise ModelLoadError(
            f"the tokenizer lacks Qwen's vision tokens {missing}: is it a Qwen3-VL tokenizer?"
        )
    expected = {
        "<|vision_start|>": config.vision_start_token_id,
        "<|vision_end|>": config.vision_end_token_id,
        IMAGE_PAD: config.image_token_id,
    }
    wrong = {t: (ids[t], expected[t]) for t in VISION_TOKENS if ids[t] != expected[t]}
    if wrong:
        raise ModelLoadError(f"tokenizer and model disagree on vision token ids (tokenizer, model): {wrong}")
    if image_processor is None:
        return
    vision = config.vision_config
    pairs = {
        "patch_size": (image_processor.patch_size, vision.patch_size),
        "merge_size": (image_processor.merge_size, vision.spatial_merge_size),
        "temporal_patch_size": (image_processor.temporal_patch_size, vision.temporal_patch_size),
    }
    bad = {k: v for k, v in pairs.items() if v[0] != v[1]}
    if bad:
        raise ModelLoadError(f"image processor and vision config disagree (processor, model): {bad}")
