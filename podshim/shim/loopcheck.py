"""A debug check, for the test suites: report every callback that blocks the shim's only loop.

With ``PODSHIM_LOOP_BLOCK_MS`` set in the shim's environment (the e2e harness sets it on its
containerd, whose shims inherit it), the loop runs in asyncio's debug mode and asyncio's
slow-callback warning ("Executing <callback> took N seconds") fires at that bound.  On a busy
machine a callback also "takes" the time it waited for a CPU; that part is not the shim's doing,
so a warning is passed on only when the callback's own time (wall time less the time its thread
sat runnable on the run queue, from ``/proc/thread-self/schedstat``) is over the bound too.  What
passes is logged with ``BLOCKED_MARK``, which the harness looks for in containerd's log.
"""

from __future__ import annotations

import asyncio
import logging
import os
from asyncio import events
from collections.abc import Callable

ENV = "PODSHIM_LOOP_BLOCK_MS"
BLOCKED_MARK = "podshim: the event loop was blocked"

_last_wait = 0.0  # run-queue wait, in seconds, during the callback that ran last


def _run_queue_wait() -> float:
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _timed_run(run: Callable[[events.Handle], None]) -> Callable[[events.Handle], None]:
    def _run(self: events.Handle) -> None:
        global _last_wait
        before = _run_queue_wait()
        try:
            run(self)
        finally:
            _last_wait = _run_queue_wait() - before

    return _run


class _Blocked(logging.Filter):
    def __init__(self, bound: float) -> None:
        super().__init__()
        self.bound = bound

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Executing %s took"):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        took = args[1] if len(args) > 1 and isinstance(args[1], float) else 0.0
        own = took - _last_wait
        if own < self.bound:
            return False  # it waited for a CPU; it did not block
        record.msg = f"{BLOCKED_MARK}: {record.msg} ({own:.3f} s of it not waiting for a CPU)"
        return True


def install_from_env(loop: asyncio.AbstractEventLoop) -> bool:
    value = os.environ.get(ENV, "")
    if not value:
        return False
    install(loop, float(value) / 1000)
    logging.getLogger("podshim").info("loop check: callbacks over %s ms are reported", value)
    return True


def install(loop: asyncio.AbstractEventLoop, bound: float) -> Callable[[], None]:
    """Check ``loop``; returns the undo (for tests: the shim keeps it for life)."""
    run = events.Handle._run
    setattr(events.Handle, "_run", _timed_run(run))  # noqa: B010 - a debug-only patch
    loop.set_debug(True)
    loop.slow_callback_duration = bound
    check = _Blocked(bound)
    logging.getLogger("asyncio").addFilter(check)

    def undo() -> None:
        setattr(events.Handle, "_run", run)  # noqa: B010
        loop.set_debug(False)
        logging.getLogger("asyncio").removeFilter(check)

    return undo
