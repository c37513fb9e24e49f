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
    """Rows per unit, as the read tasks found them (a Ray actor); the driver takes what is new."""

    def __init__(self):
        self.new: dict[str, int] = {}

    def read(self, unit: str, rows: int) -> None:
        self.new[unit] = rows  # a retried read task reads the same unit again: the same count

    def take(self) -> dict[str, int]:
        new, self.new = self.new, {}
        return new


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


def start_ledger():
    import ray

    return ray.remote(num_cpus=0)(UnitLedger).remote()
