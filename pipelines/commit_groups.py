"""When a group of work units can commit: the driver's bookkeeping of a backfill's one Ray Data execution.

All of a run's pending units go through one execution; they are grouped (`work_units.waves`, about
`commit_rows` rows each) and each group commits on its own (`lance_write.commit_wave`) as soon as all of its
units are back, while the later groups are still being read, prepared and embedded. A unit is back when the
write stage has accounted for as many of its rows as its read task found: each read task tells the run's
`UnitLedger` actor its unit's row count before it hands the rows on, and each piece the write stage returns
(`lance_write.write_blocks`) names its unit and the rows of it that it saw. Groups may complete out of
order; each commit is atomic with its units, so the order does not matter to a resume.

Hand-written because Ray Data has no notion of "all the rows of this read task have been written": its
`Datasink` reports once, when the whole execution ends. State: O(units), and the pieces (fragment metadata,
error rows; no vectors) of the groups in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class UnitLedger:
    """Rows per unit as the read tasks found them, and which units may be read yet (a Ray actor).

    The read-ahead window: a unit of a group more than `window` groups past the oldest uncommitted one waits
    in `admit` before it is read, so what is in flight (rows in the object store, ids in the claim actors)
    is a few groups, whatever the corpus. Without it Ray Data reads a small corpus far ahead of the slower
    stages and interleaves every group's units, so on one node no group completes until the end.

    A window alone can deadlock: a stage with a batch size (`prepare_batch_rows`, `batch_rows`) holds its
    last rows until a full batch arrives, and those rows would wait for a commit that waits for them. So
    when every admitted unit has been read and fewer than `slack` rows (the stages' batch sizes together)
    are on their way to the writers, the lowest-numbered waiting unit goes ahead of the window (an escape,
    counted). Units are numbered as in the run (`str(number)`); `group_of` maps each to its group's index.
    """

    def __init__(self, group_of: dict[str, int] | None = None, window: int = 0, slack: int = 0):
        import asyncio

        self.group_of = group_of or {}
        self.window, self.slack = window, slack
        self.open = sorted(set(self.group_of.values()))  # uncommitted groups, ascending
        self.new: dict[str, int] = {}
        self.rows: dict[str, int] = {}  # unit -> rows its read found
        self.admitted: set[str] = set()
        self.waiting: set[str] = set()
        self.written = 0  # rows the writers returned (as the driver saw them)
        self.escapes = 0
        self.held = 0  # units that had to wait for the window
        self.waited = 0.0  # seconds they waited, together
        self.changed = asyncio.Condition()

    async def admit(self, unit: str) -> bool:
        """Return once `unit` may be read (at once without a window)."""
        import time

        async with self.changed:
            self.waiting.add(unit)
            if not self._may_read(unit):
                since = time.monotonic()
                self.held += 1
                await self.changed.wait_for(lambda: self._may_read(unit))
                self.waited += time.monotonic() - since
            self.waiting.discard(unit)
            self.admitted.add(unit)
            self.changed.notify_all()
        return True

    def _may_read(self, unit: str) -> bool:
        if not self.window or unit in self.admitted or unit not in self.group_of:
            return True  # no window, a read task retried, or a unit the window does not know
        if not self.open or self.group_of[unit] < self.open[0] + self.window:
            return True
        unread = any(u not in self.rows for u in self.admitted)
        on_their_way = sum(self.rows.values()) - self.written
        if unread or on_their_way >= self.slack or unit != min(self.waiting, key=int):
            return False
        self.escapes += 1
        return True

    async def read(self, unit: str, rows: int) -> None:
        async with self.changed:
            self.rows[unit] = rows  # a retried read task reads the same unit again: the same count
            self.new[unit] = rows
            self.changed.notify_all()

    async def wrote(self, rows: int) -> None:
        """The driver: the writers returned `rows` more rows."""
        async with self.changed:
            self.written += rows
            self.changed.notify_all()

    async def commit(self, group: int) -> None:
        """The driver: `group` is committed; the window moves on past the oldest uncommitted group."""
        async with self.changed:
            if group in self.open:
                self.open.remove(group)
            self.changed.notify_all()

    def take(self) -> dict[str, int]:
        new, self.new = self.new, {}
        return new

    def escaped(self) -> int:
        return self.escapes

    def held_back(self) -> tuple[int, float]:
        """Units that waited for the window, and their seconds of waiting together (a read task's wall time
        in Ray Data's stats includes its wait)."""
        return self.held, self.waited


@dataclass
class Group:
    """One group of units: number -> `WorkUnit.key`, and the pieces returned for them so far."""

    index: int
    units: dict[str, str]
    pieces: list[dict[str, Any]] = field(default_factory=list)


class GroupTracker:
    """The groups of one execution, which of them are complete, and the rows seen of each unit."""

    def __init__(self, groups: list[list[tuple[int, Any]]]):
        self.groups = [Group(i, {str(n): u.key for n, u in g}) for i, g in enumerate(groups)]
        self.group_of = {n: g.index for g in self.groups for n in g.units}
        self.open = dict.fromkeys(range(len(self.groups)))  # in order; a dict as an ordered set
        self.rows: dict[str, int] = {}  # unit -> rows its read found
        self.seen: dict[str, int] = {}  # unit -> rows the write stage accounted for

    def read(self, rows: dict[str, int]) -> None:
        """Units' row counts from the ledger."""
        self.rows.update(rows)

    def add(self, piece: dict[str, Any]) -> None:
        unit = piece["unit"]
        index = self.group_of.get(unit)
        if index is None or index not in self.open:
            where = "no group of this run" if index is None else f"group {index}, committed already"
            raise RuntimeError(f"the writers returned rows of unit {unit} ({where})")
        self.seen[unit] = self.seen.get(unit, 0) + piece["counts"]["read"]
        self.groups[index].pieces.append(piece)

    def ready(self) -> list[Group]:
        """The open groups whose every unit is back, now taken out of the open ones."""
        done = [self.groups[i] for i in self.open if all(self._back(u) for u in self.groups[i].units)]
        for group in done:
            del self.open[group.index]
        return done

    def _back(self, unit: str) -> bool:
        if unit not in self.rows:
            return False
        seen = self.seen.get(unit, 0)
        if seen > self.rows[unit]:  # a row written twice: never committed
            raise RuntimeError(f"unit {unit}: its read found {self.rows[unit]} rows, the writers {seen}")
        return seen == self.rows[unit]

    def in_flight(self) -> int:
        """Open groups under way: a unit of them read (as far as the ledger has said) or a row of them back."""
        return sum(any(u in self.rows or u in self.seen for u in self.groups[i].units) for i in self.open)

    def check_finished(self) -> None:
        """After the execution: every group committed, else say which units are short."""
        if not self.open:
            return
        short = [
            f"{u} ({self.seen.get(u, 0)} of {self.rows.get(u, '?')} rows)"
            for i in self.open
            for u in self.groups[i].units
            if not self._back(u)
        ]
        raise RuntimeError(
            f"the execution ended with {len(self.open)} group(s) incomplete: units {short[:10]}"
        )


def start_ledger(group_of: dict[str, int] | None = None, window: int = 0, slack: int = 0):
    """The run's `UnitLedger` actor (async: the read tasks wait in `admit`, holding nothing but a call)."""
    import ray

    return ray.remote(num_cpus=0)(UnitLedger).remote(group_of, window, slack)
