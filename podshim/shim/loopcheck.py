"""A debug check, for the test suites: report every callback that blocks the shim's only loop.

With ``PODSHIM_LOOP_BLOCK_MS`` set in the shim's environment (the e2e harness sets it on its
containerd, whose shims inherit it), the loop runs in asyncio's debug mode and asyncio's
slow-callback warning ("Executing <callback> took N seconds") fires at that bound.  On a busy
machine a callback also "takes" the time it waited for a CPU; that part is not the shim's doing,
so a warning is passed on only when the callback's own time (wall time less the time its thread
sat runnable on the run queue, from ``/proc/thread-self/schedstat``, and less the garbage
collector's pauses, which are no call of ours) is over the bound too.  A watchdog thread
samples the loop thread's stack when a callback runs past the bound, and the report names that
line; a short stall the watchdog did not see either (under twice the bound) was the whole
process standing still, and is only noted.  What is reported carries ``BLOCKED_MARK``, which
the harness looks for in containerd's log.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import threading
import time
import traceback
from asyncio import events
from collections.abc import Callable

ENV = "PODSHIM_LOOP_BLOCK_MS"
BLOCKED_MARK = "podshim: the event loop was blocked"

_last_wait = 0.0  # run-queue wait, in seconds, during the callback that ran last
_last_gc = 0.0  # time in the garbage collector during it
_gc_total = 0.0
_gc_started = 0.0


def _gc_timer(phase: str, info: dict[str, int]) -> None:
    global _gc_total, _gc_started
    if phase == "start":
        _gc_started = time.monotonic()
    elif _gc_started:
        _gc_total += time.monotonic() - _gc_started
        _gc_started = 0.0


def _run_queue_wait() -> float:
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class _Watchdog:
    """Samples the loop thread's stack once a callback has run past the bound, so the report
    names the line that blocked, not just the task."""

    def __init__(self, bound: float) -> None:
        self.bound = bound
        self.loop_thread = threading.get_ident()
        self.started = 0.0  # when the running callback began; 0 between callbacks
        self.seq = 0
        self.stack = ""
        self.stopped = False
        threading.Thread(target=self._watch, name="loopcheck", daemon=True).start()

    def _watch(self) -> None:
        sampled = -1
        while not self.stopped:
            time.sleep(self.bound / 4)
            started, seq = self.started, self.seq
            if started and seq != sampled and time.monotonic() - started > self.bound:
                frame = sys._current_frames().get(self.loop_thread)
                if frame is not None:
                    self.stack = "".join(traceback.format_stack(frame)[-6:])
                sampled = seq


def _timed_run(run: Callable[[events.Handle], None], dog: _Watchdog) -> Callable[[events.Handle], None]:
    def _run(self: events.Handle) -> None:
        global _last_wait, _last_gc
        before = _run_queue_wait()
        gc_before = _gc_total
        dog.seq += 1
        dog.stack = ""
        dog.started = time.monotonic()
        try:
            run(self)
        finally:
            dog.started = 0.0
            _last_wait = _run_queue_wait() - before
            _last_gc = _gc_total - gc_before

    return _run


class _Blocked(logging.Filter):
    def __init__(self, bound: float, dog: _Watchdog | None = None) -> None:
        super().__init__()
        self.bound = bound
        self.dog = dog

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Executing %s took"):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        took = args[1] if len(args) > 1 and isinstance(args[1], float) else 0.0
        own = took - _last_wait - _last_gc
        if own < self.bound:
            return False  # it waited for a CPU, or the collector ran: no call of ours blocked
        stack = self.dog.stack if self.dog is not None else ""
        if not stack and own < 2 * self.bound:
            # The watchdog thread did not catch the loop thread past the bound either: the whole
            # process stood still (memory reclaim, a page fault on a busy node), not a call.
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"loop check: the process stalled: {record.msg}"
            return True
        where = f"; it was at: {stack!r}" if stack else ""
        record.msg = (f"{BLOCKED_MARK}: {record.msg} ({own:.3f} s of it neither waiting for a CPU nor "
                      f"collecting garbage){where}")  # fmt: skip
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
    dog = _Watchdog(bound)
    gc.callbacks.append(_gc_timer)
    setattr(events.Handle, "_run", _timed_run(run, dog))  # noqa: B010 - a debug-only patch
    loop.set_debug(True)
    loop.slow_callback_duration = bound
    check = _Blocked(bound, dog)
    logging.getLogger("asyncio").addFilter(check)

    def undo() -> None:
        dog.stopped = True
        gc.callbacks.remove(_gc_timer)
        setattr(events.Handle, "_run", run)  # noqa: B010
        loop.set_debug(False)
        logging.getLogger("asyncio").removeFilter(check)

    return undo
