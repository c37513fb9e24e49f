"""The driver's bookkeeping of one execution: a group commits once every unit of it is back, whatever order
the pieces come in, and a row accounted for twice or a piece of a committed group is an error, never a commit."""

import pytest

from pipelines.commit_groups import GroupTracker, UnitLedger
from pipelines.work_units import WorkUnit


def units(*numbers: int) -> list[tuple[int, WorkUnit]]:
    return [
        (n, WorkUnit(source=0, kind="range", path="docs.jsonl", start=n * 100, end=n * 100 + 100))
        for n in numbers
    ]


def piece(unit: int, rows: int) -> dict:
    return {"unit": str(unit), "counts": {"read": rows}, "fragments": [], "errors": [], "retried": []}


def test_a_group_is_ready_only_when_each_unit_has_all_the_rows_its_read_found():
    tracker = GroupTracker([units(0, 1), units(2)])
    tracker.add(piece(0, 5))
    tracker.read({"0": 5})
    assert tracker.ready() == []  # unit 1 not read yet
    tracker.read({"1": 7})
    tracker.add(piece(1, 3))
    assert tracker.ready() == [] and tracker.in_flight() == 1
    tracker.read({"2": 4})  # group 1 read, nothing of it written yet: under way too
    assert tracker.in_flight() == 2
    tracker.add(piece(1, 4))
    (group,) = tracker.ready()
    assert group.index == 0 and len(group.pieces) == 3
    assert set(group.units) == {"0", "1"} and group.units["1"] == units(1)[0][1].key
    assert tracker.ready() == [] and tracker.in_flight() == 1  # taken once


def test_groups_complete_in_any_order_and_a_unit_without_rows_needs_no_piece():
    tracker = GroupTracker([units(0), units(1, 2)])
    tracker.read({"1": 2, "2": 0})
    tracker.add(piece(1, 2))
    assert [g.index for g in tracker.ready()] == [1]
    with pytest.raises(RuntimeError, match=r"1 group\(s\) incomplete: units \['0 \(0 of \? rows\)'\]"):
        tracker.check_finished()
    tracker.read({"0": 1})
    tracker.add(piece(0, 1))
    assert [g.index for g in tracker.ready()] == [0]
    tracker.check_finished()


def test_rows_accounted_for_twice_or_a_piece_of_a_committed_group_fail_the_run():
    tracker = GroupTracker([units(0), units(1)])
    tracker.read({"0": 2, "1": 2})
    tracker.add(piece(0, 2))
    tracker.ready()
    with pytest.raises(RuntimeError, match="unit 0 .*committed already"):
        tracker.add(piece(0, 1))
    with pytest.raises(RuntimeError, match="no group of this run"):
        tracker.add(piece(9, 1))
    tracker.add(piece(1, 3))
    with pytest.raises(RuntimeError, match="unit 1: its read found 2 rows, the writers 3"):
        tracker.ready()


# -- the read-ahead window --------------------------------------------------------------------------------------


def in_a_loop(scenario):
    """Run `scenario(start, settle)` in an event loop, as the ledger actor's calls run: `start` makes a call a
    task, `settle` lets the waiting calls look again."""
    import asyncio

    async def settle():
        for _ in range(5):
            await asyncio.sleep(0)

    async def main():
        return await scenario(asyncio.create_task, settle)

    return asyncio.run(main())


GROUP_OF = {str(n): n // 2 for n in range(10)}  # two units a group: 0-1 in group 0, 2-3 in 1, ...


def test_units_of_the_window_are_read_at_once_and_later_ones_wait_for_the_oldest_groups_commit_and_the_wait_is_counted():
    import asyncio

    async def scenario(start, settle):
        ledger = UnitLedger(GROUP_OF, window=2, slack=0)
        calls = {u: start(ledger.admit(u)) for u in ("0", "1", "2", "3", "4")}
        await settle()
        assert [u for u, c in calls.items() if c.done()] == ["0", "1", "2", "3"]
        for unit in ("0", "1", "2", "3"):
            await ledger.read(unit, 10)
        await ledger.commit(1)  # a later group committing first does not move the window
        await settle()
        assert not calls["4"].done()
        await asyncio.sleep(0.05)
        await ledger.commit(0)
        await settle()
        assert calls["4"].done() and ledger.escaped() == 0
        held, waited = ledger.held_back()  # unit 4 alone waited, and for about the 50 ms it was kept out
        assert held == 1 and 0.04 < waited < 5

    in_a_loop(scenario)


def test_a_unit_goes_past_the_window_only_when_every_admitted_unit_is_read_and_few_rows_are_on_their_way():
    async def scenario(start, settle):
        ledger = UnitLedger(GROUP_OF, window=1, slack=8)
        first = [start(ledger.admit(u)) for u in ("0", "1")]
        await settle()
        later = {u: start(ledger.admit(u)) for u in ("3", "2")}
        await settle()
        assert all(c.done() for c in first) and not any(c.done() for c in later.values())
        await ledger.read("0", 5)
        await settle()
        assert not any(c.done() for c in later.values())  # unit 1 is admitted and not read yet
        await ledger.read("1", 5)  # 10 rows on their way: a batch could be under way, not held back
        await settle()
        assert not any(c.done() for c in later.values())
        await ledger.wrote(3)  # 7 rows on their way, fewer than the stages' batches hold: the lowest goes
        await settle()
        assert later["2"].done() and not later["3"].done() and ledger.escaped() == 1
        await ledger.read("2", 0)
        await settle()
        assert later["3"].done() and ledger.escaped() == 2  # one at a time, each once the last is read

    in_a_loop(scenario)


def test_a_retried_read_is_admitted_again_and_without_a_window_nothing_waits():
    async def scenario(start, settle):
        ledger = UnitLedger(GROUP_OF, window=1, slack=0)
        assert await ledger.admit("0") and await ledger.admit("0")
        unbounded = UnitLedger()
        calls = [start(unbounded.admit(str(n))) for n in range(10)]
        await settle()
        assert all(c.done() for c in calls)

    in_a_loop(scenario)
