"""The cgroup readers and the OOM watch that the shim and the guest agent share, driven from
both sides: the shim's asyncio adapter (OOMWatcher) and the agent's thread (Container)."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from podshim.guest.containers import Container
from podshim.system import cgroupfs
from podshim.system.cgroupfs import Cgroup, OOMWatch
from podshim.system.cgroups import OOMWatcher


def _v2_dir(tmp_path: Path) -> Path:
    d = tmp_path / "cg"
    d.mkdir()
    (d / "memory.max").write_text("max\n")
    (d / "memory.current").write_text("4096\n")
    (d / "memory.swap.max").write_text("1048576\n")
    (d / "pids.max").write_text("max\n")
    (d / "pids.current").write_text("3\n")
    (d / "cpu.stat").write_text("usage_usec 10\nuser_usec 6\nsystem_usec 4\n")
    (d / "memory.stat").write_text("anon 100\nfile 200\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n")
    return d


def test_v2_metrics_report_max_as_containerds_unlimited(tmp_path: Path) -> None:
    """The guest reported "max" as 2^64-1 and the shim as 0: one reader now, containerd's way."""
    m = cgroupfs.v2_metrics(Cgroup({}, str(_v2_dir(tmp_path))))
    assert m["memory"]["usage_limit"] == cgroupfs.UNLIMITED
    assert m["memory"]["swap_limit"] == 1048576
    assert m["memory"]["usage"] == 4096 and m["memory"]["anon"] == 100
    assert m["pids"] == {"current": 3, "limit": cgroupfs.UNLIMITED}
    assert m["cpu"]["usage_usec"] == 10
    assert m["memory_events"] == {"low": 0, "high": 0, "max": 2, "oom": 1, "oom_kill": 1}


def test_v1_pids_max_is_zero_as_containerds_v1_reader_has_it(tmp_path: Path) -> None:
    (tmp_path / "pids.max").write_text("max\n")
    (tmp_path / "pids.current").write_text("2\n")
    assert cgroupfs.v1_metrics(Cgroup({"pids": str(tmp_path)}, None))["pids"] == {"current": 2, "limit": 0}


def _wait(cond: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_oom_watch_counts_from_its_creation_and_ends_with_the_cgroup(tmp_path: Path) -> None:
    d = _v2_dir(tmp_path)
    w = OOMWatch(Cgroup({}, str(d)))
    try:
        assert w.check() is False  # the kill counted before the watch is old news
        (d / "memory.events").write_text("oom 2\noom_kill 2\n")
        assert w.check() is True
        (d / "memory.events").write_text("oom 2\noom_kill 2\nmax 3\n")
        assert w.check() is False
        shutil.rmtree(d)
        assert w.check() is None
    finally:
        w.close()


def test_oom_watch_needs_a_memory_cgroup() -> None:
    try:
        OOMWatch(Cgroup({"pids": "/nonexistent"}, None))
    except OSError:
        return
    raise AssertionError("a watch without a memory cgroup was made")


async def test_the_shims_adapter_calls_back_on_a_kill(tmp_path: Path) -> None:
    d = _v2_dir(tmp_path)
    got: list[str] = []
    watcher = OOMWatcher(got.append)
    watcher.add("c1", Cgroup({}, str(d)))
    try:
        (d / "memory.events").write_text("oom_kill 5\n")
        async with asyncio.timeout(10):
            while not got:
                await asyncio.sleep(0.01)
        assert got == ["c1"]
    finally:
        watcher.close()


class _Agent:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def event(self, obj: dict[str, Any]) -> None:
        self.events.append(obj)


def test_the_agents_thread_sends_an_oom_event_and_stops(tmp_path: Path) -> None:
    d = _v2_dir(tmp_path)
    agent = _Agent()
    c = Container(agent, "c1", "/b")  # type: ignore[arg-type]
    c.cgroup = Cgroup({}, str(d))
    before = {t.name for t in threading.enumerate()}
    c.watch_oom()
    assert "oom-c1" in {t.name for t in threading.enumerate()} - before
    (d / "memory.events").write_text("oom_kill 2\n")
    _wait(lambda: agent.events, "the OOM event")
    assert agent.events == [{"event": "oom", "id": "c1"}]
    c.stop_oom()
    _wait(lambda: "oom-c1" not in {t.name for t in threading.enumerate()}, "the watch thread to end")
    assert os.path.isdir(d)
