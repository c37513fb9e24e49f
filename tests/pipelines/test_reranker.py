"""The reranker gives exactly the official Qwen3-VL-Reranker scores (float32, <= 1e-5).

The reference (`tests/pipelines/official.py`) is the authors' `Qwen3VLReranker.process` rebuilt without
`pipelines/`: their conversation, the chat template, the processor, one pair at a time with left padding, the
generation class's base model and its LM head's "yes"/"no" rows, a sigmoid.
"""

import numpy as np
import pytest
import torch

from pipelines.items import EmptyTextError, InvalidItemError
from pipelines.reranker import Reranker
from tests.conftest import make_image
from tests.pipelines import official

QUERY = {"text": "a red car near the sea"}
DOCUMENTS = [
    {"text": "The red car follows the long road near the sea."},
    {"text": "Three apples on a wooden table."},
    {"image": make_image(1, (120, 90))},
    {"text": "a photo of the garden", "image": make_image(2, (64, 160))},
]


@pytest.fixture(scope="module", params=["reranker", "embedding"])
def flavour(request, tiny_reranker_dir, tiny_embedding_dir):
    """(generation model, official processor, our reranker): the reranker flavour (an LM head of its own, a
    tokenizer that adds nothing) and the embedding one (tied head, a tokenizer that appends <|endoftext|>)."""
    from transformers import Qwen3VLForConditionalGeneration

    directory = tiny_reranker_dir if request.param == "reranker" else tiny_embedding_dir
    model = Qwen3VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    processor = official.processor_of(directory, padding_side="left")
    reranker = Reranker.load(str(directory), device="cpu", dtype="float32")
    return model, processor, reranker


@pytest.mark.parametrize("instruction", [None, "Retrieve images or text relevant to the user's query."])
def test_scores_equal_the_official_scores(flavour, instruction):
    model, processor, reranker = flavour
    expected = official.official_rerank_scores(model, processor, QUERY, DOCUMENTS, instruction)
    got = reranker.score(QUERY, DOCUMENTS, instruction=instruction)
    assert got.dtype == np.float32 and ((got > 0) & (got < 1)).all()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_an_image_query_against_image_documents_equals_the_official_scores(flavour):
    """Two images in one pair: the query's and the document's."""
    model, processor, reranker = flavour
    query = {"text": "the same picture", "image": make_image(3, (96, 96))}
    expected = official.official_rerank_scores(model, processor, query, DOCUMENTS)
    np.testing.assert_allclose(reranker.score(query, DOCUMENTS), expected, atol=1e-5, rtol=0)


def test_our_pair_tokens_are_the_official_ones(flavour):
    model, processor, reranker = flavour
    for document in DOCUMENTS:
        conversation = official.reranker_conversation(QUERY, document)
        text = processor.apply_chat_template([conversation], tokenize=False, add_generation_prompt=True)
        images = [official.fetch_image(document["image"])] if "image" in document else None
        ids = processor(text=text, images=images, do_resize=False, return_tensors="pt")["input_ids"][0]
        assert reranker.prepare(QUERY, document).input_ids.tolist() == ids.tolist()


def test_the_score_reads_the_lm_head_not_the_token_embeddings(tiny_reranker_dir):
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_reranker_dir, dtype=torch.float32)
    reranker = Reranker.load(str(tiny_reranker_dir), device="cpu", dtype="float32")
    vocab = reranker.preparer.tokenizer.get_vocab()
    head = model.lm_head.weight[vocab["yes"]] - model.lm_head.weight[vocab["no"]]
    embed = model.model.language_model.embed_tokens.weight
    assert not torch.allclose(head, embed[vocab["yes"]] - embed[vocab["no"]])
    torch.testing.assert_close(reranker._direction, head.float())


def test_rerank_orders_by_score_and_cuts_at_top_n(flavour):
    _, _, reranker = flavour
    scores = reranker.score(QUERY, DOCUMENTS)
    results = reranker.rerank(QUERY, DOCUMENTS, top_n=2)
    assert [r.index for r in results] == list(np.argsort(-scores, kind="stable")[:2])
    assert [r.score for r in results] == pytest.approx(sorted(scores, reverse=True)[:2])


def test_the_padded_and_packed_layouts_give_the_same_scores(tiny_reranker_dir):
    padded = Reranker.load(str(tiny_reranker_dir), device="cpu", dtype="float32")
    packed = Reranker.load(str(tiny_reranker_dir), device="cpu", dtype="float32", attention_layout="packed")
    np.testing.assert_allclose(packed.score(QUERY, DOCUMENTS), padded.score(QUERY, DOCUMENTS), atol=1e-5)


def test_a_long_document_loses_its_end_and_the_template_survives(tiny_reranker_dir):
    short = Reranker.load(str(tiny_reranker_dir), device="cpu", dtype="float32")
    fixed = short.prepare(QUERY, "w").num_tokens
    reranker = Reranker.load(str(tiny_reranker_dir), device="cpu", dtype="float32", max_length=fixed + 20)
    pair = reranker.prepare(QUERY, "word " * 500)
    decoded = reranker.preparer.tokenizer.decode(pair.input_ids)
    assert pair.truncated and fixed + 15 <= pair.num_tokens <= fixed + 20 + reranker.preparer.kept_tail
    assert decoded.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "<Query>:a red car near the sea\n<Document>:word word" in decoded


def test_bad_documents_come_back_as_errors_naming_them_and_the_others_are_scored(tiny_reranker_dir):
    reranker = Reranker.load(str(tiny_reranker_dir), device="cpu", dtype="float32")
    result = reranker.try_score(QUERY, ["fine", "   ", {"image": b"not an image"}, "also fine"])
    assert result.indices == [0, 3] and len(result.scores) == 2
    assert [e.index for e in result.errors] == [1, 2] and isinstance(result.errors[0], EmptyTextError)
    np.testing.assert_allclose(result.scores, reranker.score(QUERY, ["fine", "also fine"]), atol=1e-6)
    with pytest.raises(InvalidItemError, match="takes no 'instruction'"):
        reranker.score({"text": "q", "instruction": "x"}, ["d"])
