"""The driver's bookkeeping of one execution: a group commits once every unit of it is back, whatever order
the pieces come in, and a row accounted for twice or a piece of a committed group is an error, never a commit."""

import pytest

from pipelines.commit_groups import GroupTracker
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
