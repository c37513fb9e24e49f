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
