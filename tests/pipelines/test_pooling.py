import pytest
import torch

from pipelines.pooling import last_token_index, normalize, pool, pool_packed, truncate

HIDDEN = torch.tensor(
    [
        [[1.0, 2.0], [3.0, -4.0], [5.0, 6.0], [float("nan"), 0.0]],  # right-padded: 3 real tokens
        [[float("nan"), 9.0], [0.0, 1.0], [2.0, -3.0], [4.0, 5.0]],  # left-padded: 3 real tokens
    ]
)
MASK = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])


def test_mean_averages_only_real_tokens_and_ignores_nan_padding():
    assert torch.allclose(pool(HIDDEN, MASK, "mean"), torch.tensor([[3.0, 4.0 / 3.0], [2.0, 1.0]]))


def test_max_takes_the_largest_real_value():
    assert torch.equal(pool(HIDDEN, MASK, "max"), torch.tensor([[5.0, 6.0], [4.0, 5.0]]))


def test_cls_is_the_first_real_token_under_left_and_right_padding():
    assert torch.equal(pool(HIDDEN, MASK, "cls"), torch.tensor([[1.0, 2.0], [0.0, 1.0]]))


def test_last_is_the_last_real_token_under_left_and_right_padding():
    assert torch.equal(pool(HIDDEN, MASK, "last"), torch.tensor([[5.0, 6.0], [4.0, 5.0]]))
    assert last_token_index(torch.tensor([[1, 1, 1, 1]])).item() == 3


def test_pooling_returns_float32_for_low_precision_input():
    assert pool(HIDDEN.nan_to_num().bfloat16(), MASK, "mean").dtype == torch.float32


def test_unknown_mode_and_empty_rows_are_refused():
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(HIDDEN, MASK, "median")
    with pytest.raises(ValueError, match="at least one real token"):
        pool(HIDDEN, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), "mean")


def test_normalize_gives_unit_rows_and_truncate_keeps_a_prefix():
    vectors = torch.tensor([[3.0, 4.0, 12.0]])
    assert torch.allclose(normalize(vectors).norm(dim=-1), torch.ones(1))
    assert torch.equal(truncate(vectors, 2), torch.tensor([[3.0, 4.0]]))
    with pytest.raises(ValueError, match="larger than"):
        truncate(vectors, 4)


def test_matryoshka_cuts_and_renormalises_numpy_and_torch_alike():
    import numpy as np

    from pipelines.pooling import matryoshka

    rows = np.array([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]], np.float32)
    cut = matryoshka(rows, 2, True)
    np.testing.assert_allclose(cut, [[0.6, 0.8], [0.0, 1.0]], atol=1e-6)
    assert cut.dtype == np.float32
    np.testing.assert_allclose(matryoshka(torch.from_numpy(rows), 2, True).numpy(), cut, atol=1e-6)
    np.testing.assert_allclose(matryoshka(rows, 2, False), rows[:, :2])
    assert matryoshka(rows, None, True) is rows and matryoshka(rows, 3, True) is rows


# the two rows of HIDDEN without their padding, laid end to end: offsets 0, 3, 6
PACKED = torch.tensor([[1.0, 2.0], [3.0, -4.0], [5.0, 6.0], [0.0, 1.0], [2.0, -3.0], [4.0, 5.0]])
OFFSETS = torch.tensor([0, 3, 6], dtype=torch.int32)


def test_packed_pooling_of_hand_made_sequences():
    assert torch.allclose(pool_packed(PACKED, OFFSETS, "mean"), torch.tensor([[3.0, 4.0 / 3.0], [2.0, 1.0]]))
    assert torch.equal(pool_packed(PACKED, OFFSETS, "max"), torch.tensor([[5.0, 6.0], [4.0, 5.0]]))
    assert torch.equal(pool_packed(PACKED, OFFSETS, "cls"), torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    assert torch.equal(pool_packed(PACKED, OFFSETS, "last"), torch.tensor([[5.0, 6.0], [4.0, 5.0]]))


def test_packed_pooling_equals_padded_pooling_on_hand_made_states():
    lengths = [3, 1, 4]
    hidden = torch.randn(sum(lengths), 5)
    offsets = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    padded = torch.full((3, 4, 5), float("nan"))
    mask = torch.zeros(3, 4, dtype=torch.long)
    start = 0
    for row, n in enumerate(lengths):
        padded[row, :n] = hidden[start : start + n]
        mask[row, :n] = 1
        start += n
    for mode in ("mean", "max", "cls", "last"):
        torch.testing.assert_close(pool_packed(hidden, offsets, mode), pool(padded, mask, mode), msg=mode)


def test_packed_pooling_refuses_an_unknown_mode_and_a_padded_batch():
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_packed(PACKED, OFFSETS, "median")
    with pytest.raises(ValueError, match=r"expected hidden \[T, D\]"):
        pool_packed(HIDDEN, OFFSETS, "mean")
