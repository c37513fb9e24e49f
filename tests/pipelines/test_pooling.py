import pytest
import torch

from pipelines.pooling import last_token_index, normalize, pool, truncate

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
