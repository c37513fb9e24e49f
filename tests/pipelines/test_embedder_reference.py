"""The embedder computes exactly what the plain transformers forward computes (float32, <= 1e-5)."""

import numpy as np
import pytest
import torch

from pipelines.embedder import Embedder
from tests.conftest import make_image
from tests.pipelines.reference import VISION, embed_item, reference_embedding, reference_inputs

TEXT = "The quick red car follows two white clouds near the sea."


@pytest.fixture(scope="module")
def generation_model(tiny_model_dir):
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def processor_parts(embedder):
    return embedder.tokenizer, embedder.image_processor


CASES = {
    "text": (TEXT, None),
    "image": ("", make_image(1, (120, 90))),
    "text+image": ("a photo of the garden", make_image(2, (64, 160))),
}


@pytest.mark.parametrize("modality", sorted(CASES))
@pytest.mark.parametrize("layer", [-1, 2])
@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "last"])
def test_instruct_mean_matches_the_plain_forward(
    tiny_model_dir, generation_model, processor_parts, modality, layer, pooling
):
    text, image = CASES[modality]
    embedder = Embedder(
        generation_model, processor_parts[0], image_processor=processor_parts[1], pooling=pooling, layer=layer
    )
    prompt = (VISION if image is not None else "") + text
    expected = reference_embedding(
        generation_model, reference_inputs(*processor_parts, prompt, image), layer, pooling
    )
    got = embedder.embed_batch([embed_item(text, image)])[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("modality", sorted(CASES))
def test_qwen3_vl_embedding_recipe_matches_the_plain_forward(generation_model, processor_parts, modality):
    text, image = CASES[modality]
    embedder = Embedder(
        generation_model, processor_parts[0], image_processor=processor_parts[1], recipe="qwen3-vl-embedding"
    )
    prompt = (
        "<|im_start|>system\nRepresent the user's input.<|im_end|>\n<|im_start|>user\n"
        + (VISION if image is not None else "")
        + text
        + "<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"
    )
    expected = reference_embedding(
        generation_model, reference_inputs(*processor_parts, prompt, image), -1, "last"
    )
    np.testing.assert_allclose(
        embedder.embed_batch([embed_item(text, image)])[0], expected, atol=1e-5, rtol=0
    )


def test_every_layer_index_including_embeddings_matches_the_plain_forward(generation_model, processor_parts):
    image = make_image(3)
    inputs = reference_inputs(*processor_parts, VISION + TEXT, image)
    for layer in range(-5, 5):
        embedder = Embedder(
            generation_model, processor_parts[0], image_processor=processor_parts[1], layer=layer
        )
        expected = reference_embedding(generation_model, inputs, layer, "mean")
        got = embedder.embed_batch([{"text": TEXT, "image": image}])[0]
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=f"layer {layer}")


def test_layer_out_of_range_is_a_clear_error(generation_model, processor_parts):
    with pytest.raises(ValueError, match="out of range"):
        Embedder(generation_model, processor_parts[0], layer=5)


def test_an_embedder_built_from_a_generation_model_shares_its_weights(generation_model, processor_parts):
    embedder = Embedder(generation_model, processor_parts[0])
    assert embedder.model is generation_model.model
    assert embedder.model.language_model.embed_tokens.weight.data_ptr() == (
        generation_model.model.language_model.embed_tokens.weight.data_ptr()
    )
