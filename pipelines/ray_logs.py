"""Where Ray's own output goes when a backfill starts Ray: to Ray's log files, unless asked for (`--verbose`).

A user of `vlm-embed backfill` should see progress and the summary, not Ray's internals: its start-up lines,
Ray Data's execution plan and its 20-line progress dumps every 10 s (off a terminal), the workers' output,
and an error-level line from Ray's C++ core about actor constructor arguments. That last one is Ray Data's
own doing, not the job's: Ray Data 2.60 `ray.put`s every actor pool's map function and context and hands them
to its actors as constructor arguments, with actor restarts on by default (ray-project/ray#53727). Turning
restarts off would silence it at the price of the pool's fault tolerance, so the line is routed instead.

`init_ray_quietly` starts or joins Ray with
- Ray's Python logs on the console at ERROR (all still in the session's log files);
- Ray Data's console at WARNING, so its warnings (e.g. an actor pool that cannot be scheduled) still show,
  and its INFO lines stay in `logs/ray-data*.log`; its progress bars still draw on a terminal;
- the workers' stdout and stderr left in their `logs/worker-*` files (`log_to_driver=False`);
- the driver's own file descriptor 2, where Ray's C++ core writes, moved to `logs/vlm-embed-driver.err`
  (the core's lines are in `logs/python-core-driver-*.log` as well), while Python's `sys.stderr` (tracebacks,
  warnings, our log lines, progress bars) stays on the console.
"""

from __future__ import annotations

import logging
import os
import sys

NATIVE_STDERR_FILE = "vlm-embed-driver.err"


class ConsoleHandler(logging.StreamHandler):
    """A log handler writing to whatever `sys.stderr` is when a record is emitted (it may be moved)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def init_ray_quietly(address: str | None) -> None:
    import ray
    import ray.data  # configures Ray Data's loggers, adjusted below

    context = ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; its file handlers keep every record
            handler.setLevel(logging.WARNING)
    session_dir = context.address_info.get("session_dir")
    if session_dir:
        move_native_stderr(os.path.join(session_dir, "logs", NATIVE_STDERR_FILE))


def move_native_stderr(path: str) -> bool:
    """Point file descriptor 2 at `path`, keeping `sys.stderr` on the console through a copy of the old one.

    Only where `sys.stderr` is descriptor 2 (a command's process, not a test capturing it); returns whether
    it moved."""
    try:
        if sys.stderr.fileno() != 2:
            return False
    except (AttributeError, OSError, ValueError):
        return False
    try:
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:  # a session directory on another machine (Ray Client): leave descriptor 2 alone
        return False
    sys.stderr.flush()
    console = os.fdopen(
        os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors=sys.stderr.errors or "strict"
    )
    os.dup2(target, 2)
    os.close(target)
    sys.stderr = console
    return True
