"""The preparer's pure helpers: truncation that keeps special tokens, and what a tokenizer adds around text."""

import numpy as np

from pipelines.prepare import keep_special_tokens_truncate, special_tokens_added

S, T = 900, 901  # two special ids


def test_truncation_keeps_every_special_token_and_the_first_other_tokens():
    ids = np.array([S, 1, 2, S, 3, 4, T, 5])
    assert keep_special_tokens_truncate(ids, 6, {S, T}).tolist() == [S, 1, 2, S, 3, T]
    assert keep_special_tokens_truncate(ids, 4, {S, T}).tolist() == [S, 1, S, T]


def test_truncation_leaves_a_short_sequence_alone_and_never_drops_specials():
    ids = np.array([S, 1, T])
    assert keep_special_tokens_truncate(ids, 3, {S, T}).tolist() == [S, 1, T]
    assert keep_special_tokens_truncate(ids, 1, {S, T}).tolist() == [
        S,
        T,
    ]  # longer than asked: the caller checks


def test_the_tokens_a_tokenizer_adds_are_read_off_its_output(embedder, tiny_embedding_dir):
    from transformers import AutoTokenizer

    assert special_tokens_added(embedder.tokenizer) == ([], [])
    tokenizer = AutoTokenizer.from_pretrained(tiny_embedding_dir)
    assert special_tokens_added(tokenizer) == ([], [tokenizer.convert_tokens_to_ids("<|endoftext|>")])


def test_a_text_past_the_tokenizers_own_limit_is_truncated_without_its_warning(embedder):
    """transformers warns that a sequence over model_max_length "will result in indexing errors"; we truncate
    such texts correctly, so the warning would only mislead (issue 18, item 6)."""
    import logging

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    library = logging.getLogger("transformers")  # its modules' loggers hand their records up to it
    library.addHandler(handler)
    try:
        text = "the cat sees a bright picture " * (embedder.tokenizer.model_max_length // 4)
        prepared = embedder.prepare(text)
    finally:
        library.removeHandler(handler)
    assert prepared.truncated and prepared.num_tokens == embedder.config.max_length
    assert not [m for m in messages if "indexing errors" in m]
