"""A debug check, for the test suites: report every callback that blocks the shim's only loop.

With ``PODSHIM_LOOP_BLOCK_MS`` set in the shim's environment (the e2e and CRI harnesses set it on
their containerd, whose shims inherit it), every callback the loop runs is timed, as asyncio's
debug mode does for its slow-callback warning ("Executing <callback> took N seconds").  asyncio's
debug mode itself is not used: it records a stack at every Future, and the ``os.stat`` of each
source file that costs blocked the loop on a busy disk by itself.

On a busy machine a callback also "takes" the time it waited for a CPU, and the garbage
collector's pauses; neither is a call of ours, so a callback is reported only when its own time
(wall time less the time its thread sat runnable on the run queue, from
``/proc/thread-self/schedstat``, less the collector's pauses) is over the bound.  A watchdog
thread samples the loop thread's stack when a callback runs past the bound, and the report names
that line.  A short stall the watchdog did not see either (under twice the bound) was the whole
process standing still (memory reclaim, a page fault on a busy node), and is only noted.  What
is reported carries ``BLOCKED_MARK``, which the harnesses look for in containerd's log.
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

log = logging.getLogger("podshim.loopcheck")
Verdict = tuple[int, str] | None


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
        self.gc_total = 0.0
        self._gc_started = 0.0
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

    def gc_timer(self, phase: str, info: dict[str, int]) -> None:
        if threading.get_ident() != self.loop_thread:
            return
        if phase == "start":
            self._gc_started = time.monotonic()
        elif self._gc_started:
            self.gc_total += time.monotonic() - self._gc_started
            self._gc_started = 0.0


def verdict(took: float, cpu_wait: float, gc_pause: float, stack: str, bound: float) -> Verdict:
    """(log level, what to say) about a callback that took ``took`` seconds, or None."""
    own = took - cpu_wait - gc_pause
    if took < bound or own < bound:
        return None  # quick, or it waited for a CPU, or the collector ran: no call of ours blocked
    if not stack and own < 2 * bound:
        return logging.INFO, f"loop check: the process stalled for {own:.3f} s (no call of ours seen)"
    where = f"; it was at: {stack!r}" if stack else ""
    return logging.WARNING, (f"{BLOCKED_MARK}: a callback took {took:.3f} s, {own:.3f} s of it neither "
                             f"waiting for a CPU nor collecting garbage{where}")  # fmt: skip


def _describe(handle: events.Handle) -> str:
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", None)
    return repr(owner) if isinstance(owner, asyncio.Task) else repr(handle)


def _timed_run(run: Callable[[events.Handle], None], dog: _Watchdog) -> Callable[[events.Handle], None]:
    def _run(self: events.Handle) -> None:
        wait0, gc0 = _run_queue_wait(), dog.gc_total
        dog.seq += 1
        dog.stack = ""
        t0 = dog.started = time.monotonic()
        try:
            run(self)
        finally:
            took = time.monotonic() - t0
            dog.started = 0.0
            if took >= dog.bound:
                said = verdict(took, _run_queue_wait() - wait0, dog.gc_total - gc0, dog.stack, dog.bound)
                if said is not None:
                    log.log(said[0], "%s (executing %s)", said[1], _describe(self))

    return _run


def install_from_env(loop: asyncio.AbstractEventLoop) -> bool:
    value = os.environ.get(ENV, "")
    if not value:
        return False
    install(loop, float(value) / 1000)
    log.info("loop check: callbacks over %s ms are reported", value)
    return True


def install(loop: asyncio.AbstractEventLoop, bound: float) -> Callable[[], None]:
    """Check every callback the loops of this thread run; returns the undo (for tests: the
    shim keeps it for life)."""
    run = events.Handle._run
    dog = _Watchdog(bound)
    gc.callbacks.append(dog.gc_timer)
    setattr(events.Handle, "_run", _timed_run(run, dog))  # noqa: B010 - a debug-only patch

    def undo() -> None:
        dog.stopped = True
        gc.callbacks.remove(dog.gc_timer)
        setattr(events.Handle, "_run", run)  # noqa: B010

    return undo
