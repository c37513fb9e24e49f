"""A call's prepared items enter the model replica's batch queue as few entries, each within the token budget
(`serve.models.within_budget`), and the budget counts padded tokens over all items of a batch."""

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from serve.models import _Pending, padded_tokens, within_budget


@dataclass
class Item:
    num_tokens: int


def test_short_items_of_a_call_go_as_one_entry():
    items = [Item(10), Item(30), Item(20)]
    (entry,) = within_budget(items, budget=1000)
    assert entry.prepared == items and entry.longest == 30


def test_a_call_over_the_budget_is_cut_where_the_padded_cost_would_pass_it():
    items = [Item(100)] * 5 + [Item(300)]
    entries = within_budget(items, budget=400)
    assert [len(e.prepared) for e in entries] == [4, 1, 1]
    assert all(padded_tokens([e]) <= 400 for e in entries)


def test_an_item_longer_than_the_budget_goes_alone_at_the_budget():
    (entry,) = within_budget([Item(5000)], budget=1024)
    assert entry.longest == 1024 and padded_tokens([entry]) == 1024


def test_padded_tokens_counts_every_item_of_the_batch_at_the_longest():
    batch = [_Pending([Item(3), Item(7)], 7), _Pending([Item(10)], 10)]
    assert padded_tokens(batch) == 3 * 10


@given(st.lists(st.integers(1, 3000), min_size=1, max_size=60), st.integers(16, 4096))
def test_entries_keep_every_item_in_order_and_each_fits(tokens, budget):
    items = [Item(n) for n in tokens]
    entries = within_budget(items, budget)
    assert [item for e in entries for item in e.prepared] == items
    for entry in entries:
        assert entry.longest == max(min(i.num_tokens, budget) for i in entry.prepared)
        assert padded_tokens([entry]) <= budget
    for first, second in zip(
        entries, entries[1:], strict=False
    ):  # cut only where the next item would not fit
        merged = _Pending(
            first.prepared + second.prepared[:1],
            max(first.longest, min(second.prepared[0].num_tokens, budget)),
        )
        assert padded_tokens([merged]) > budget
