"""Batching never changes a vector: alone or in a padded batch, left or right padding, any order."""

import numpy as np
import pytest

from pipelines.embedder import Embedder
from tests.conftest import make_image

ITEMS = [
    "short",
    "A much longer sentence about the old ship that carries three apples near the sea, again and again.",
    {"image": make_image(10, (64, 64))},
    {"text": "a picture of a quiet garden", "image": make_image(11, (200, 96))},
    "Number 42 and 294: xxB",
    {"text": "medium length text with an image", "image": make_image(12, (48, 140))},
]


@pytest.fixture(scope="module", params=["left", "right"])
def padded_embedder(request, tiny_model_dir):
    return Embedder.load(str(tiny_model_dir), device="cpu", padding_side=request.param)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "last"])
def test_item_alone_equals_item_in_padded_batch(tiny_model_dir, padded_embedder, pooling):
    embedder = Embedder(
        padded_embedder.model,
        padded_embedder.tokenizer,
        image_processor=padded_embedder.image_processor,
        padding_side=padded_embedder.padding_side,
        pooling=pooling,
        layer=2,
    )
    together = embedder.embed_batch(ITEMS)
    for index, item in enumerate(ITEMS):
        alone = embedder.embed_batch([item])[0]
        np.testing.assert_allclose(together[index], alone, atol=1e-5, rtol=0, err_msg=f"item {index}")


def test_padded_batches_really_pad(padded_embedder):
    from pipelines.forward import collate

    prepared = [padded_embedder.prepare(item) for item in ITEMS[:2]]
    batch = collate(prepared, padded_embedder.pad_token_id, padded_embedder.padding_side)
    mask = batch.attention_mask.numpy()
    assert mask.sum(axis=1).tolist() == [p.num_tokens for p in prepared]
    padded_column = 0 if padded_embedder.padding_side == "left" else -1
    assert mask[0, padded_column] == 0


def test_batch_order_does_not_change_any_vector(embedder):
    forward = embedder.embed_batch(ITEMS)
    order = [3, 0, 5, 2, 4, 1]
    shuffled = embedder.embed_batch([ITEMS[i] for i in order])
    np.testing.assert_allclose(shuffled, forward[order], atol=1e-5, rtol=0)


def test_small_token_budgets_and_batch_sizes_give_the_same_vectors(tiny_model_dir, embedder):
    tight = Embedder.load(str(tiny_model_dir), device="cpu", max_batch_tokens=64)
    np.testing.assert_allclose(tight.embed_batch(ITEMS), embedder.embed_batch(ITEMS), atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        embedder.embed_batch(ITEMS, batch_size=1), embedder.embed_batch(ITEMS), atol=1e-5, rtol=0
    )


def test_vectors_have_unit_norm_when_normalising(embedder):
    norms = np.linalg.norm(embedder.embed_batch(ITEMS), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_no_normalize_keeps_raw_pooled_vectors(tiny_model_dir, embedder):
    raw = Embedder.load(str(tiny_model_dir), device="cpu", normalize=False).embed_batch(ITEMS)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(
        raw / np.linalg.norm(raw, axis=1, keepdims=True), embedder.embed_batch(ITEMS), atol=1e-5
    )


def test_dimensions_truncates_then_renormalises(tiny_model_dir, embedder):
    short = Embedder.load(str(tiny_model_dir), device="cpu", dimensions=16)
    assert short.get_embedding_dimension() == 16
    vectors = short.embed_batch(ITEMS)
    assert vectors.shape == (len(ITEMS), 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    raw = Embedder.load(str(tiny_model_dir), device="cpu", normalize=False).embed_batch(ITEMS)[:, :16]
    np.testing.assert_allclose(vectors, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


def test_dimensions_larger_than_the_model_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="larger than the model"):
        Embedder.load(str(tiny_model_dir), device="cpu", dimensions=65)


def test_results_come_back_in_input_order_with_the_expected_shape_and_dtype(embedder):
    vectors = embedder.embed_batch(ITEMS)
    assert vectors.shape == (len(ITEMS), embedder.get_embedding_dimension()) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors[1], embedder.embed_text(ITEMS[1]), atol=1e-5)
    np.testing.assert_allclose(vectors[2], embedder.embed_image(ITEMS[2]["image"]), atol=1e-5)
    np.testing.assert_allclose(
        vectors[3], embedder.embed_multimodal(ITEMS[3]["text"], ITEMS[3]["image"]), atol=1e-5
    )


def test_the_image_matters(embedder):
    image = make_image(20)
    text_only = embedder.embed_text("a photo of a cat")
    with_image = embedder.embed_multimodal("a photo of a cat", image)
    with_other_image = embedder.embed_multimodal("a photo of a cat", make_image(21))
    assert float(text_only @ with_image) < 0.999
    assert float(with_image @ with_other_image) < 0.9999
    np.testing.assert_allclose(embedder.embed_image(image), embedder.embed_image(image.copy()), atol=1e-6)


def test_the_same_image_as_pil_bytes_or_path_gives_the_same_vector(embedder, tmp_path):
    image = make_image(22)
    path = tmp_path / "same.png"
    image.save(path)
    from_pil = embedder.embed_image(image)
    np.testing.assert_allclose(embedder.embed_image(path.read_bytes()), from_pil, atol=1e-6)
    np.testing.assert_allclose(embedder.embed_image(str(path)), from_pil, atol=1e-6)
