"""An item the model cannot embed costs only its own result: the others of its batch keep their vectors."""

import numpy as np
import pytest

from pipelines.embedder import Embedder
from pipelines.items import ForwardError
from tests.conftest import POISON, make_image

GOOD = ["a fine text", {"text": "a caption", "image": make_image(4)}, "another fine text"]


@pytest.fixture(scope="module")
def poisoned(poisoned_model_dir):
    return Embedder.load(str(poisoned_model_dir), device="cpu", dtype="float32")


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_a_non_finite_vector_is_an_error_and_the_batch_keeps_the_others(poisoned, embedder, layout):
    engine = Embedder(
        poisoned.model, poisoned.tokenizer, image_processor=poisoned.image_processor, attention_layout=layout
    )
    items = [GOOD[0], POISON, GOOD[1], GOOD[2]]
    result = engine.try_embed_batch(items)
    assert result.indices == [0, 2, 3]
    assert [(e.index, e.kind) for e in result.errors] == [(1, "forward_failed")]
    assert "non-finite" in result.errors[0].reason
    np.testing.assert_allclose(
        result.vectors, embedder.embed_batch(GOOD), atol=1e-5
    )  # as if it were not there


class _FailsOn(Embedder):
    """An embedder whose forward pass raises whenever a batch holds an item of `bad` tokens."""

    bad = 0
    calls = 0

    def embed_prepared(self, prepared, batch_size=None):
        type(self).calls += 1
        if any(p.num_tokens == self.bad for p in prepared):
            raise RuntimeError("CUDA out of memory (pretend)")
        return super().embed_prepared(prepared, batch_size)


def test_a_forward_pass_that_raises_is_split_until_the_failing_item_is_found(embedder):
    engine = _FailsOn(embedder.model, embedder.tokenizer, image_processor=embedder.image_processor)
    items = ["one", "two words", "three words here", "four words are here", "five words are here now"]
    prepared = [engine.prepare(item) for item in items]
    _FailsOn.bad = prepared[3].num_tokens
    result = engine.try_embed_prepared(prepared)
    assert result.indices == [0, 1, 2, 4]
    (error,) = result.errors
    assert isinstance(error, ForwardError) and error.index == 3 and "out of memory (pretend)" in error.reason
    np.testing.assert_allclose(
        result.vectors, embedder.embed_batch([items[i] for i in (0, 1, 2, 4)]), atol=1e-5
    )
    assert _FailsOn.calls <= 1 + 2 * 3  # halving: at most two calls per level of a 5-item batch


def test_embed_batch_raises_a_forward_error_naming_the_item(poisoned):
    with pytest.raises(ForwardError, match="item 1: the model gave a non-finite vector"):
        poisoned.embed_batch([GOOD[0], POISON])
    raw = poisoned.embed_prepared([poisoned.prepare(POISON)])  # the low-level step does not check
    assert not np.isfinite(raw).all()


def test_the_reranker_scores_around_a_poisoned_document(poisoned_model_dir, tiny_model_dir):
    from pipelines.reranker import Reranker

    poisoned = Reranker.load(str(poisoned_model_dir), device="cpu", dtype="float32")
    clean = Reranker.load(str(tiny_model_dir), device="cpu", dtype="float32")
    result = poisoned.try_score("a query", ["fine", POISON, "also fine"])
    assert result.indices == [0, 2] and [(e.index, e.kind) for e in result.errors] == [(1, "forward_failed")]
    np.testing.assert_allclose(result.scores, clean.score("a query", ["fine", "also fine"]), atol=1e-6)
