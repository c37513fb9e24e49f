"""The real-shape configs build (on the meta device, no memory) with the parameter counts of the releases."""

import pytest

from pipelines.model_shapes import random_model, shape_processor_parts


@pytest.fixture(scope="module")
def tokenizer():
    return shape_processor_parts()[0]


@pytest.mark.parametrize(("shape", "low", "high"), [("2b", 2.0e9, 2.4e9), ("8b", 8.2e9, 9.0e9)])
def test_real_shapes_have_the_released_parameter_counts(tokenizer, shape, low, high):
    model = random_model(shape, tokenizer, device="meta", generation=True)
    count = sum(p.numel() for p in model.parameters())
    assert low <= count <= high, f"{shape}: {count / 1e9:.2f}B parameters"
    assert model.config.vision_config.out_hidden_size == model.config.text_config.hidden_size
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_unknown_shape_is_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown shape"):
        random_model("70b", tokenizer, device="meta")
