"""Requests that arrive while earlier ones are being served go on together: fewer, larger calls downstream.

An ingress replica forwards prepared items to the model deployment. Every call costs the model replica (one
process) Serve's request handling, whatever it carries, so sending each HTTP request on its own caps a model
replica's request rate well below what its forward pass could batch (benchmarks/NOTES.md). `Coalescer` keeps
`slots` calls in flight; what is submitted meanwhile waits and leaves in the next call, up to `max_items`
items, or in a call of its own as soon as `group_items` items wait (so that a backlog moves on to the model
replicas, where their autoscaling policy counts it: `serve.autoscaling`). Nothing waits on a timer: alone, a
request leaves at once.

Pure asyncio (no Ray): one event loop, the replica's, runs it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Rows:
    """What a downstream call gives back: a row per item (`values`) and, by item position, why an item has
    no row (`errors`; its row is then filler): one failing item fails only its own request."""

    values: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)

    def split(self, bounds: Sequence[int]) -> list[Rows]:
        starts = [0, *bounds]
        parts = np.split(self.values, bounds)
        return [
            Rows(part, {i - start: e for i, e in self.errors.items() if start <= i < start + len(part)})
            for start, part in zip(starts, parts, strict=True)
        ]


Send = Callable[[list[Any]], Awaitable["np.ndarray | Rows"]]


def split_rows(result: np.ndarray | Rows, bounds: Sequence[int]) -> list:
    return result.split(bounds) if isinstance(result, Rows) else np.split(result, bounds)


class Coalescer:
    """`await submit(items)` -> the rows of `send(all items of its group)` that belong to `items` (an array,
    or `Rows` with the errors of those items when `send` gives `Rows`)."""

    def __init__(self, send: Send, slots: int = 2, max_items: int = 256, group_items: int = 8):
        if min(slots, max_items, group_items) < 1:
            raise ValueError(
                f"slots, max_items and group_items must be >= 1, got {slots}, {max_items} and {group_items}"
            )
        self._send = send
        self.slots = slots
        self.max_items = max_items
        self.group_items = group_items
        self._waiting: deque[tuple[Sequence[Any], asyncio.Future]] = deque()
        self._waiting_items = 0
        self._in_flight = 0
        self.calls = 0  # calls made so far (each with one or more submissions)
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, items: Sequence[Any]) -> np.ndarray | Rows:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((items, future))
        self._waiting_items += len(items)
        self._start_calls()
        return await future

    def _start_calls(self) -> None:
        while self._in_flight < self.slots or self._waiting_items >= self.group_items:
            group = self._next_group()
            if not group:
                return
            self._in_flight += 1
            self.calls += 1
            task = asyncio.ensure_future(self._call(group))
            self._tasks.add(task)  # keep a reference until it is done
            task.add_done_callback(self._tasks.discard)

    def _next_group(self) -> list[tuple[Sequence[Any], asyncio.Future]]:
        """The oldest waiting submissions, up to `max_items` items (a larger one alone); cancelled ones dropped."""
        group, count = [], 0
        while self._waiting:
            items, future = self._waiting[0]
            if future.done():  # its caller gave up (a timeout): nothing to send
                self._waiting.popleft()
                self._waiting_items -= len(items)
                continue
            if group and count + len(items) > self.max_items:
                break
            self._waiting.popleft()
            self._waiting_items -= len(items)
            group.append((items, future))
            count += len(items)
        return group

    async def _call(self, group: list[tuple[Sequence[Any], asyncio.Future]]) -> None:
        try:
            vectors = await self._send([item for items, _ in group for item in items])
        except asyncio.CancelledError:
            for _, future in group:
                future.cancel()
            raise
        except Exception as exc:  # every submission of the call gets the call's error
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
        else:
            bounds = np.cumsum([len(items) for items, _ in group])[:-1]
            for (_, future), rows in zip(group, split_rows(vectors, bounds), strict=True):
                if not future.done():
                    future.set_result(rows)
        finally:
            self._in_flight -= 1
            self._start_calls()
