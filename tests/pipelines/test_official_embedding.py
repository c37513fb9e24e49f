"""The qwen3-vl-embedding recipe gives exactly the official Qwen3-VL-Embedding vectors (float32, <= 1e-5).

The reference (`tests/pipelines/official.py`) is the authors' procedure rebuilt without `pipelines/`: their
conversation, the chat template, the processor with special tokens on, the HF model, the last attended
position. Both tokenizer flavours: one that appends <|endoftext|> (the released embedding checkpoints) and one
that does not (an Instruct checkpoint used with this recipe).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.embedder import Embedder
from tests.conftest import make_image
from tests.pipelines import official


def _rgba():
    """Half transparent: the pixels under the transparent half are red, which white compositing hides."""
    pixels = np.zeros((80, 120, 4), np.uint8)
    pixels[..., 0] = 255
    pixels[:, :60, 3] = 255
    pixels[:, 60:, 1] = np.arange(60, dtype=np.uint8)[None, :] * 4
    return Image.fromarray(pixels, "RGBA")


CASES = {
    "text": ("The quick red car follows two white clouds near the sea.", None),
    "image": (None, make_image(1, (120, 90))),
    "text+image": ("a photo of the garden", make_image(2, (64, 160))),
    "small image": ("upscaled to the minimum", make_image(3, (20, 24))),
    "transparent image": ("white behind it", _rgba()),
}
INSTRUCTIONS = [None, "Find the matching product photo", "  Classify the sentiment:  "]


@pytest.fixture(scope="module", params=["embedding", "instruct"])
def flavour(request, tiny_embedding_dir, tiny_model_dir):
    """(name, checkpoint directory, generation model, our embedder) of one tokenizer flavour."""
    from transformers import Qwen3VLForConditionalGeneration

    directory = tiny_embedding_dir if request.param == "embedding" else tiny_model_dir
    model = Qwen3VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    embedder = Embedder.load(str(directory), device="cpu", dtype="float32", recipe="qwen3-vl-embedding")
    return request.param, directory, model, embedder


@pytest.fixture(scope="module")
def processor(flavour):
    return official.processor_of(flavour[1], padding_side="right")


def _item(text, image, instruction=None):
    item = {key: value for key, value in (("text", text), ("image", image)) if value is not None}
    if instruction is not None:
        item["instruction"] = instruction
    return item


@pytest.mark.parametrize("instruction", INSTRUCTIONS)
def test_every_case_equals_the_official_vector_in_one_padded_batch(flavour, processor, instruction):
    _, _, model, embedder = flavour
    cases = list(CASES.values())
    expected, _, _ = official.official_embeddings(
        model.model, processor, [official.embedding_conversation(t, i, instruction) for t, i in cases]
    )
    got = embedder.embed_batch([_item(t, i, instruction) for t, i in cases])
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_case_alone_equals_the_official_vector(flavour, processor, case):
    _, _, model, embedder = flavour
    text, image = CASES[case]
    expected, _, _ = official.official_embeddings(
        model.model, processor, [official.embedding_conversation(text, image)]
    )
    np.testing.assert_allclose(
        embedder.embed_batch([_item(text, image)]), expected.numpy(), atol=1e-5, rtol=0
    )


def test_the_pooled_token_is_endoftext_in_ours_and_in_the_reference(flavour, processor):
    _, _, model, embedder = flavour
    end = embedder.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    conversations = [official.embedding_conversation(t, i) for t, i in CASES.values()]
    _, ids, mask = official.official_embeddings(model.model, processor, conversations)
    last = mask.shape[1] - 1 - mask.flip(dims=[1]).argmax(dim=1)
    assert ids[torch.arange(len(ids)), last].tolist() == [end] * len(ids)
    for text, image in CASES.values():
        prepared = embedder.prepare(_item(text, image))
        assert prepared.input_ids[-1] == end
        assert int((prepared.input_ids == end).sum()) == 1  # exactly one, whatever the tokenizer adds


def test_our_token_ids_are_the_official_ones(flavour, processor):
    _, _, model, embedder = flavour
    for text, image in CASES.values():
        _, ids, _ = official.official_embeddings(
            model.model, processor, [official.embedding_conversation(text, image)]
        )
        assert embedder.prepare(_item(text, image)).input_ids.tolist() == ids[0].tolist()


def test_queries_use_the_official_query_instruction(flavour, processor):
    _, _, model, embedder = flavour
    text, image = CASES["text+image"]
    expected, _, _ = official.official_embeddings(
        model.model, processor, [official.embedding_conversation(text, image, official.QUERY_INSTRUCTION)]
    )
    np.testing.assert_allclose(embedder.embed_query(text, image), expected[0].numpy(), atol=1e-5, rtol=0)
    document = embedder.embed_batch([_item(text, image)])[0]
    assert float(document @ expected[0].numpy()) < 0.9999  # documents are embedded differently


def test_an_items_own_instruction_wins_over_the_query_instruction(flavour, processor):
    _, _, model, embedder = flavour
    expected, _, _ = official.official_embeddings(
        model.model, processor, [official.embedding_conversation("a cat", None, "Match the caption")]
    )
    got = embedder.embed_queries([{"text": "a cat", "instruction": "Match the caption"}])
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=0)


def test_a_large_image_is_resized_within_the_official_bounds(flavour, processor):
    _, _, model, embedder = flavour
    image = make_image(
        4, (1500, 1000)
    )  # 1.5 M pixels: over the Instruct bound (1280*32*32), under 1800*32*32
    expected, ids, _ = official.official_embeddings(
        model.model, processor, [official.embedding_conversation(None, image)]
    )
    prepared = embedder.prepare({"image": image})
    assert prepared.input_ids.tolist() == ids[0].tolist()
    np.testing.assert_allclose(embedder.embed_batch([{"image": image}]), expected.numpy(), atol=1e-5, rtol=0)
