"""Random-weight Qwen3-VL models at the real 2B and 8B shapes, for speed and precision checks on a GPU.

Speed does not depend on weight values, so a model built from the released configs' numbers (see
shared BENCHMARK.md) measures throughput honestly without downloading anything. The tokenizer is the tiny
model's (its ids all fall inside the real vocabulary size).
"""

from __future__ import annotations

_ROPE = {
    "rope_type": "default",
    "rope_theta": 5_000_000.0,
    "mrope_section": [24, 20, 20],
    "mrope_interleaved": True,
}

SHAPES: dict[str, dict] = {
    "2b": {
        "text": dict(
            hidden_size=2048,
            num_hidden_layers=28,
            intermediate_size=6144,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            rope_parameters=_ROPE,
            max_position_embeddings=262144,
            rms_norm_eps=1e-6,
        ),
        "vision": dict(
            depth=24,
            hidden_size=1024,
            intermediate_size=4096,
            num_heads=16,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=2048,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[5, 11, 17],
        ),
        "tie_word_embeddings": True,
    },
    "8b": {
        "text": dict(
            hidden_size=4096,
            num_hidden_layers=36,
            intermediate_size=12288,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            rope_parameters=_ROPE,
            max_position_embeddings=262144,
            rms_norm_eps=1e-6,
        ),
        "vision": dict(
            depth=27,
            hidden_size=1152,
            intermediate_size=4304,
            num_heads=16,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=4096,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[8, 16, 24],
        ),
        "tie_word_embeddings": False,
    },
}


def shape_config(shape: str, tokenizer):
    """A `Qwen3VLConfig` at a real shape whose special token ids match `tokenizer`."""
    from transformers import Qwen3VLConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
    spec = SHAPES[shape]
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>")
    }
    return Qwen3VLConfig(
        text_config=dict(spec["text"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(spec["vision"]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec["tie_word_embeddings"],
    )


def shape_processor_parts():
    """(tokenizer, image processor) for a real-shape model: the tiny tokenizer, Qwen3-VL's image settings."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from pipelines.tiny_model import build_tokenizer

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=64 * 32 * 32,
        max_pixels=1280 * 32 * 32,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return build_tokenizer(), image_processor


def random_model(
    shape: str,
    tokenizer,
    *,
    device: str = "cuda",
    dtype=None,
    seed: int = 0,
    generation: bool = False,
    attn_implementation: str = "sdpa",
):
    """A random-weight model built directly on `device` (seconds, not minutes): the base model, or the
    generation class (with its LM head) when `generation` is true."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLModel

    config = shape_config(shape, tokenizer)
    config._attn_implementation = attn_implementation
    cls = Qwen3VLForConditionalGeneration if generation else Qwen3VLModel
    return model_from_config(cls, config, device=device, dtype=dtype or torch.bfloat16, seed=seed)


def model_from_config(cls, config, *, device: str, dtype, seed: int = 0):
    """`cls(config)` with seeded random weights, built directly on `device` in `dtype`, in eval mode."""
    import torch

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = cls(config)
        finally:
            torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)
