"""Prompt formats: exactly the reference strings, and the chat template agrees with them."""

import pytest

from pipelines.config import EmbedderConfig
from pipelines.items import parse_item
from pipelines.recipes import format_prompt
from tests.conftest import make_image

REFERENCE = "<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{vision}{text}<|im_end|>\n<|im_start|>assistant\n"
VISION = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.mark.parametrize(
    ("text", "has_image", "vision"),
    [("what is a cat?", False, ""), (None, True, VISION), ("a cat on a mat", True, VISION)],
)
def test_qwen3_vl_embedding_prompt_is_exactly_the_reference_string(text, has_image, vision):
    expected = REFERENCE.format(instruction="Represent the user's input.", vision=vision, text=text or "")
    assert format_prompt("qwen3-vl-embedding", text, has_image) == expected
    custom = format_prompt("qwen3-vl-embedding", text, has_image, "Find the matching product photo.")
    assert custom == REFERENCE.format(
        instruction="Find the matching product photo.", vision=vision, text=text or ""
    )


def test_instruct_mean_uses_the_text_as_it_is_and_puts_the_image_first():
    assert format_prompt("instruct-mean", "  keep my spaces ", False) == "  keep my spaces "
    assert format_prompt("instruct-mean", "caption", True) == VISION + "caption"
    assert format_prompt("instruct-mean", None, True) == VISION


def test_preparer_tokens_decode_to_the_reference_string(tiny_model_dir):
    from pipelines.embedder import Embedder

    embedder = Embedder.load(str(tiny_model_dir), device="cpu", recipe="qwen3-vl-embedding")
    for item in [
        "what is a cat?",
        {"image": make_image()},
        {"text": "a cat on a mat", "image": make_image()},
    ]:
        parsed = parse_item(item)
        prepared = embedder.prepare(item)
        decoded = embedder.tokenizer.decode(prepared.input_ids)
        count = decoded.count("<|image_pad|>")
        collapsed = decoded.replace("<|image_pad|>" * count, "<|image_pad|>") if count else decoded
        vision = VISION if parsed.image is not None else ""
        assert collapsed == REFERENCE.format(
            instruction="Represent the user's input.", vision=vision, text=parsed.text or ""
        )


def test_the_tiny_chat_template_renders_the_reference_string(embedder):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Represent the user's input."}]},
        {"role": "user", "content": [{"type": "image", "image": "x"}, {"type": "text", "text": "a cat"}]},
    ]
    rendered = embedder.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == REFERENCE.format(
        instruction="Represent the user's input.", vision=VISION, text="a cat"
    )


def test_instruction_is_refused_for_recipes_that_take_none():
    with pytest.raises(ValueError, match="takes no instruction"):
        EmbedderConfig(recipe="instruct-mean", instruction="Represent this")


def test_recipe_defaults_resolve_and_unknown_options_are_rejected():
    config = EmbedderConfig(recipe="qwen3-vl-embedding")
    assert (config.resolved_pooling, config.resolved_layer, config.resolved_padding_side) == (
        "last",
        -1,
        "right",
    )
    assert EmbedderConfig().resolved_pooling == "mean"
    with pytest.raises(ValueError, match="extra"):
        EmbedderConfig(poolling="mean")
    with pytest.raises(ValueError):
        EmbedderConfig(pooling="median")
