"""The e2e suite's loop check: a callback that blocks is reported with the line it blocked at;
one that was quick, waited for a CPU, or sat in the garbage collector is not."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from podshim.shim import loopcheck


async def test_a_blocking_callback_is_reported_with_its_line(caplog: pytest.LogCaptureFixture) -> None:
    undo = loopcheck.install(asyncio.get_running_loop(), 0.05)
    try:
        with caplog.at_level(logging.INFO, logger="podshim.loopcheck"):
            asyncio.get_running_loop().call_soon(time.sleep, 0.15)  # the kind of call item 7 removed
            await asyncio.sleep(0.01)
            await asyncio.sleep(0.01)
    finally:
        undo()
    blocked = [r.getMessage() for r in caplog.records if loopcheck.BLOCKED_MARK in r.getMessage()]
    assert len(blocked) == 1 and "sleep" in blocked[0], blocked


async def test_quick_callbacks_are_not(caplog: pytest.LogCaptureFixture) -> None:
    undo = loopcheck.install(asyncio.get_running_loop(), 0.05)
    try:
        with caplog.at_level(logging.INFO, logger="podshim.loopcheck"):
            for _ in range(50):
                await asyncio.sleep(0)
    finally:
        undo()
    assert not [r for r in caplog.records if loopcheck.BLOCKED_MARK in r.getMessage()]


def test_cpu_wait_and_gc_are_not_blocking() -> None:
    assert loopcheck.verdict(0.21, 0.2, 0.0, "x", 0.05) is None  # 200 ms on the run queue
    assert loopcheck.verdict(0.21, 0.0, 0.2, "x", 0.05) is None  # 200 ms collecting garbage
    said = loopcheck.verdict(0.21, 0.0, 0.0, "at sleep()", 0.05)
    assert said is not None and said[0] == logging.WARNING and loopcheck.BLOCKED_MARK in said[1]
    assert "at sleep()" in said[1]


def test_a_short_stall_nobody_saw_is_only_noted() -> None:
    said = loopcheck.verdict(0.07, 0.0, 0.0, "", 0.05)
    assert said is not None and said[0] == logging.INFO and loopcheck.BLOCKED_MARK not in said[1]
    long = loopcheck.verdict(0.2, 0.0, 0.0, "", 0.05)
    assert long is not None and loopcheck.BLOCKED_MARK in long[1]


def test_the_harness_sets_and_looks_for_what_the_shim_uses() -> None:
    src = (Path(__file__).parents[1] / "e2e" / "harness" / "containerd.py").read_text()
    assert f'LOOP_CHECK_ENV = "{loopcheck.ENV}"' in src
    assert f'LOOP_BLOCKED_MARK = "{loopcheck.BLOCKED_MARK}"' in src
