"""The e2e suite's loop check: a callback that blocks is reported, one that only waited for a
CPU or was quick is not."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from podshim.shim import loopcheck


async def test_a_blocking_callback_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    undo = loopcheck.install(asyncio.get_running_loop(), 0.05)
    try:
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            asyncio.get_running_loop().call_soon(time.sleep, 0.12)  # the kind of call item 7 removed
            await asyncio.sleep(0.01)
            await asyncio.sleep(0.01)
    finally:
        undo()
    blocked = [r.getMessage() for r in caplog.records if loopcheck.BLOCKED_MARK in r.getMessage()]
    assert len(blocked) == 1 and "sleep" in blocked[0]


async def test_quick_callbacks_are_not(caplog: pytest.LogCaptureFixture) -> None:
    undo = loopcheck.install(asyncio.get_running_loop(), 0.05)
    try:
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            for _ in range(50):
                await asyncio.sleep(0)
    finally:
        undo()
    assert not [r for r in caplog.records if loopcheck.BLOCKED_MARK in r.getMessage()]


def test_cpu_wait_is_not_blocking() -> None:
    f = loopcheck._Blocked(0.05)
    loopcheck._last_wait = 0.2  # the thread sat 200 ms on the run queue during a 210 ms callback
    rec = logging.LogRecord("asyncio", logging.WARNING, "", 0, "Executing %s took %.3f seconds",
                            ("<Handle x>", 0.21), None)  # fmt: skip
    assert not f.filter(rec)
    loopcheck._last_wait = 0.0
    assert f.filter(rec)


def test_the_harness_sets_and_looks_for_what_the_shim_uses() -> None:
    from pathlib import Path

    src = (Path(__file__).parents[1] / "e2e" / "harness" / "containerd.py").read_text()
    assert f'LOOP_CHECK_ENV = "{loopcheck.ENV}"' in src
    assert f'LOOP_BLOCKED_MARK = "{loopcheck.BLOCKED_MARK}"' in src


def test_a_short_stall_nobody_saw_is_only_noted() -> None:
    f = loopcheck._Blocked(0.05)  # no watchdog: no stack was sampled
    loopcheck._last_wait = loopcheck._last_gc = 0.0
    rec = logging.LogRecord("asyncio", logging.WARNING, "", 0, "Executing %s took %.3f seconds",
                            ("<Handle x>", 0.07), None)  # fmt: skip
    assert f.filter(rec) and rec.levelno == logging.INFO and loopcheck.BLOCKED_MARK not in rec.getMessage()
    long = logging.LogRecord("asyncio", logging.WARNING, "", 0, "Executing %s took %.3f seconds",
                             ("<Handle x>", 0.2), None)  # fmt: skip
    assert f.filter(long) and loopcheck.BLOCKED_MARK in long.getMessage()
