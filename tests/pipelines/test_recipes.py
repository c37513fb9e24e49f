"""Prompt formats: exactly the reference strings, and the chat template agrees with them."""

import pytest

from pipelines.config import EmbedderConfig
from pipelines.items import parse_item
from pipelines.recipes import format_prompt, normalize_instruction
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


@pytest.mark.parametrize("flavour", ["instruct", "embedding"])
def test_preparer_tokens_decode_to_the_reference_string_and_one_endoftext(
    tiny_model_dir, tiny_embedding_dir, flavour
):
    from pipelines.embedder import Embedder

    directory = tiny_embedding_dir if flavour == "embedding" else tiny_model_dir
    embedder = Embedder.load(str(directory), device="cpu", recipe="qwen3-vl-embedding")
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
        assert (
            collapsed
            == REFERENCE.format(
                instruction="Represent the user's input.", vision=vision, text=parsed.text or ""
            )
            + "<|endoftext|>"
        )


def test_instruct_mean_adds_no_special_tokens_even_where_the_tokenizer_would(tiny_embedding_dir):
    from pipelines.embedder import Embedder

    embedder = Embedder.load(str(tiny_embedding_dir), device="cpu", recipe="instruct-mean")
    ids = embedder.prepare("a cat on a mat").input_ids.tolist()
    assert ids == embedder.tokenizer("a cat on a mat", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("Find the matching product photo", "Find the matching product photo."),
        ("  Classify the sentiment:  ", "Classify the sentiment:"),
        ("What is shown?", "What is shown?"),
        ("Trouvez l’image «semblable»", "Trouvez l’image «semblable»"),  # » is punctuation (Pf)
        ("检索相关图片", "检索相关图片."),
        ("检索相关图片。", "检索相关图片。"),
    ],
)
def test_instructions_are_stripped_and_end_in_punctuation_as_the_official_code_makes_them(given, used):
    assert normalize_instruction(given) == used
    config = EmbedderConfig(recipe="qwen3-vl-embedding", instruction=given, query_instruction=given)
    assert config.resolved_instruction == used and config.resolved_query_instruction == used


def test_the_recipe_defaults_are_the_official_ones():
    config = EmbedderConfig(recipe="qwen3-vl-embedding")
    assert config.resolved_instruction == "Represent the user's input."
    assert config.resolved_query_instruction == "Retrieve images or text relevant to the user's query."
    assert (config.resolved_min_pixels, config.resolved_max_pixels) == (4 * 32 * 32, 1800 * 32 * 32)
    assert config.signature()["query_instruction"] == config.resolved_query_instruction
    plain = EmbedderConfig(recipe="instruct-mean")
    assert plain.resolved_query_instruction is None
    assert (plain.resolved_min_pixels, plain.resolved_max_pixels) == (64 * 64, 1280 * 32 * 32)


@pytest.mark.parametrize(
    ("model", "recipe"),
    [
        ("Qwen/Qwen3-VL-Embedding-2B", "qwen3-vl-embedding"),
        ("./models/qwen3-vl-embedding-8b/", "qwen3-vl-embedding"),
        ("tiny-embedding", "qwen3-vl-embedding"),
        ("Qwen/Qwen3-VL-2B-Instruct", "instruct-mean"),
        ("tiny", "instruct-mean"),
    ],
)
def test_recipe_auto_picks_the_embedding_recipe_for_embedding_checkpoints(model, recipe):
    assert EmbedderConfig(model=model).recipe == recipe
    assert EmbedderConfig(model=model, recipe="auto").recipe == recipe
    assert (
        EmbedderConfig(model="Qwen/Qwen3-VL-Embedding-2B", recipe="instruct-mean").recipe == "instruct-mean"
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
    with pytest.raises(ValueError, match="takes no query instruction"):
        EmbedderConfig(recipe="instruct-mean", query_instruction="Find it")
    with pytest.raises(ValueError, match="blank"):
        EmbedderConfig(recipe="qwen3-vl-embedding", query_instruction="   ")


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
