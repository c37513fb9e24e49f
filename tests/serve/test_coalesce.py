"""The coalescer: submissions that arrive while calls are out leave together, each getting its own rows."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serve.coalesce import Coalescer


class SlowDownstream:
    """Returns one row per item (the item's number), after `delay_s`; records what every call carried."""

    def __init__(self, delay_s: float = 0.05, fail_on: int | None = None):
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.calls: list[list[int]] = []

    async def __call__(self, items: list[int]) -> np.ndarray:
        self.calls.append(list(items))
        await asyncio.sleep(self.delay_s)
        if self.fail_on in items:
            raise RuntimeError(f"item {self.fail_on} broke the call")
        return np.asarray(items, np.float32)[:, None] * np.ones((1, 3), np.float32)


def requests_of(sizes: list[int]) -> list[list[int]]:
    out, start = [], 0
    for size in sizes:
        out.append(list(range(start, start + size)))
        start += size
    return out


def test_a_lone_submission_leaves_at_once_in_its_own_call():
    downstream = SlowDownstream(delay_s=0.0)

    async def main():
        coalescer = Coalescer(downstream, slots=2)
        return [await coalescer.submit([i, i + 100]) for i in range(3)]

    results = asyncio.run(main())
    assert downstream.calls == [[0, 100], [1, 101], [2, 102]]
    np.testing.assert_array_equal(results[1][:, 0], [1, 101])


def test_submissions_arriving_while_the_slots_are_busy_share_the_next_call_and_get_their_own_rows():
    downstream = SlowDownstream()
    requests = requests_of([1, 2, 3, 1, 2, 1, 1, 3, 2, 1])

    async def main():
        coalescer = Coalescer(downstream, slots=2, group_items=100)
        results = await asyncio.gather(*(coalescer.submit(items) for items in requests))
        return coalescer, results

    coalescer, results = asyncio.run(main())
    # the first two go alone into the two slots; the other eight wait and leave together in one call
    assert downstream.calls[:2] == [requests[0], requests[1]]
    assert downstream.calls[2] == [item for items in requests[2:] for item in items]
    assert coalescer.calls == len(downstream.calls) == 3
    for items, rows in zip(requests, results, strict=True):
        np.testing.assert_array_equal(rows[:, 0], items)
        assert rows.shape == (len(items), 3)


def test_once_group_items_wait_they_leave_in_a_call_of_their_own_even_with_every_slot_busy():
    downstream = SlowDownstream()

    async def main():
        coalescer = Coalescer(downstream, slots=1, group_items=4)
        return await asyncio.gather(*(coalescer.submit([i]) for i in range(10)))

    results = asyncio.run(main())
    # [0] takes the slot; then every 4 waiting items leave together; the last one when a call is back
    assert downstream.calls == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert [int(rows[0, 0]) for rows in results] == list(range(10))


def test_a_call_never_carries_more_than_max_items_but_a_larger_submission_still_goes_alone():
    downstream = SlowDownstream()
    requests = requests_of([1, 3, 3, 3, 7, 2])

    async def main():
        coalescer = Coalescer(downstream, slots=1, max_items=6, group_items=100)
        return await asyncio.gather(*(coalescer.submit(items) for items in requests))

    results = asyncio.run(main())
    sizes = [len(call) for call in downstream.calls]
    assert sizes == [1, 6, 3, 7, 2]  # [1], [3+3], [3] (3+7 > 6), [7] alone, [2]
    for items, rows in zip(requests, results, strict=True):
        np.testing.assert_array_equal(rows[:, 0], items)


def test_an_error_of_a_call_reaches_every_submission_in_it_and_no_other():
    downstream = SlowDownstream(fail_on=4)
    requests = requests_of([1, 1, 2, 2])  # [0], [1], then [2, 3] + [4, 5] together: that call fails

    async def main():
        coalescer = Coalescer(downstream, slots=2)
        return await asyncio.gather(*(coalescer.submit(items) for items in requests), return_exceptions=True)

    results = asyncio.run(main())
    np.testing.assert_array_equal(results[0][:, 0], [0])
    np.testing.assert_array_equal(results[1][:, 0], [1])
    assert [str(r) for r in results[2:]] == ["item 4 broke the call"] * 2


def test_a_submission_whose_caller_gave_up_is_not_sent_and_the_rest_still_are():
    downstream = SlowDownstream(delay_s=0.1)

    async def main():
        coalescer = Coalescer(downstream, slots=1)
        first = asyncio.ensure_future(coalescer.submit([0]))
        await asyncio.sleep(0)
        impatient = asyncio.ensure_future(asyncio.wait_for(coalescer.submit([1]), timeout=0.02))
        patient = asyncio.ensure_future(coalescer.submit([2]))
        with pytest.raises(TimeoutError):
            await impatient
        return await first, await patient

    first, patient = asyncio.run(main())
    assert downstream.calls == [[0], [2]]
    np.testing.assert_array_equal(patient[:, 0], [2])


def test_nonsense_settings_are_refused():
    with pytest.raises(ValueError, match="slots, max_items and group_items"):
        Coalescer(SlowDownstream(), slots=0)
    with pytest.raises(ValueError, match="must be >= 1"):
        Coalescer(SlowDownstream(), group_items=0)
