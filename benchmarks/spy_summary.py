"""Summarise a py-spy raw profile (`py-spy record --threads --idle --format raw`): how busy each thread was, and
where the busiest one spent its time.

    python -m benchmarks.spy_summary model.txt [--top 25]

Each line of a raw profile is `thread (tid): name;outer frame;...;inner frame COUNT`. With `--idle` every thread
is sampled every time, so a thread's share of busy samples is its busy fraction of the recording. A sample
counts as *waiting* when its innermost Python frame is a blocking call (a lock or condition wait, a selector, a
queue get, Ray's worker loop...), a thread pool's loop between work items, or when the thread has no Python
frame inside its run method (a native loop such as Ray's or gRPC's). That is a heuristic over frame names; the
per-function table below it is exact.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>\S+) \((?P<file>[^:]+):(?P<line>\d+)\)$")
# innermost frames that mean "blocked, waiting for something", by function name
_WAITING = frozenset(
    [
        "wait",
        "select",
        "poll",
        "epoll",
        "get",
        "sleep",
        "accept",
        "recv",
        "_recv_msg",
        "main_loop",
        "run_forever",
        "_run_once",
        "join",
        "acquire",
    ]
)
# frames that only start a thread: a stack ending in one of them runs native code (or nothing) underneath
_THREAD_START = {"Thread.run", "Thread._bootstrap", "Thread._bootstrap_inner"}


@dataclass
class ThreadProfile:
    name: str
    samples: int = 0
    busy: int = 0
    inclusive: Counter = field(default_factory=Counter)

    @property
    def busy_share(self) -> float:
        return self.busy / self.samples if self.samples else 0.0


def is_waiting(frames: list[str]) -> bool:
    """Whether a sample's stack (outermost first, thread label excluded) shows the thread waiting."""
    if not frames:
        return True
    match = _FRAME.match(frames[-1])
    qualified = match["function"] if match else frames[-1]
    function = qualified.rsplit(".", 1)[-1]
    if qualified in _THREAD_START:
        return True
    if function == "_worker" and match and match["file"].endswith("concurrent/futures/thread.py"):
        return True  # a pool thread between work items (inside one, the innermost frame is deeper)
    if function.endswith("_event_loop"):
        return True  # the function that runs a native event loop (uvloop): Python callbacks would show deeper
    return function in _WAITING or function.lstrip("_") in _WAITING


def parse(text: str) -> dict[str, ThreadProfile]:
    threads: dict[str, ThreadProfile] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            raise ValueError(f"not a py-spy raw line: {raw[:120]!r}")
        count = int(count_text)
        label, *frames = stack.split(";")
        thread = threads.setdefault(label, ThreadProfile(label))
        thread.samples += count
        if not is_waiting(frames):
            thread.busy += count
            for frame in set(frames):
                if frame.split(" (", 1)[0] not in _THREAD_START:  # 100% of every thread: no information
                    thread.inclusive[frame] += count
    return threads


def summary(threads: dict[str, ThreadProfile], top: int = 25, thread: str | None = None) -> str:
    """Every thread's busy share, then the functions of one thread: the first whose label contains `thread`,
    else the busiest."""
    if not threads:
        return "no samples"
    rows = sorted(threads.values(), key=lambda t: t.busy_share, reverse=True)
    lines = ["busy  samples  thread"]
    lines += [f"{t.busy_share:5.1%} {t.samples:8d}  {t.name}" for t in rows]
    chosen = next((t for t in rows if thread and thread in t.name), None) if thread else rows[0]
    if chosen is None:
        lines += ["", f"no thread's label contains {thread!r}"]
    elif chosen.busy:
        lines += ["", f"where {chosen.name} was busy (share of its busy samples, inclusive):"]
        lines += [f"{n / chosen.busy:6.1%}  {frame}" for frame, n in chosen.inclusive.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path, help="a py-spy raw profile (--threads --idle --format raw)")
    parser.add_argument("--top", type=int, default=25, help="functions listed for the chosen thread (25)")
    parser.add_argument(
        "--thread",
        help="list the functions of the thread whose label contains this (e.g. "
        "forward: the embedder's forward thread); default: the busiest thread",
    )
    args = parser.parse_args(argv)
    print(summary(parse(args.profile.read_text()), top=args.top, thread=args.thread))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
