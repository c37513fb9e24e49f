"""Token-budget batch plans: every item exactly once, budgets kept, longest first."""

import pytest

from pipelines.batching import padding_efficiency, plan_batches

LENGTHS = [5, 300, 40, 40, 1000, 7, 7, 39]


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_every_item_is_planned_exactly_once_and_too_long_items_go_alone(layout):
    batches = plan_batches(LENGTHS, max_tokens=100, max_items=3, layout=layout)
    assert sorted(i for batch in batches for i in batch) == list(range(len(LENGTHS)))
    assert all(len(batch) <= 3 for batch in batches)
    assert [4] in batches and [1] in batches
    assert batches[0] == [4]  # longest first: memory peaks at the start


def test_padded_plans_count_the_longest_item_times_the_batch_size():
    batches = plan_batches(LENGTHS, max_tokens=100, max_items=10)
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(LENGTHS[i] for i in batch) <= 100
    assert [2, 3] in batches  # 40 + 40 + 39 padded to 3 x 40 = 120 would not fit


def test_packed_plans_count_real_tokens_only():
    batches = plan_batches(LENGTHS, max_tokens=100, max_items=10, layout="packed")
    for batch in batches:
        assert len(batch) == 1 or sum(LENGTHS[i] for i in batch) <= 100
    assert [2, 3] in batches and [7, 5, 6, 0] in batches  # 40 + 40 (+ 39 > 100); 39 + 7 + 7 + 5
    padded = plan_batches(LENGTHS, max_tokens=100, max_items=10)
    assert [7, 5, 6, 0] not in padded  # padded, those four would cost 4 x 39 = 156


def test_length_sorted_padded_plans_waste_little():
    lengths = [(i * 37) % 500 + 8 for i in range(400)]
    assert padding_efficiency(lengths, plan_batches(lengths, 4096, 64)) > 0.9
    assert padding_efficiency(lengths, [list(range(0, 400, 1))]) < 0.6


def test_non_positive_budgets_are_refused():
    with pytest.raises(ValueError, match="positive"):
        plan_batches([1, 2], max_tokens=0, max_items=4)
