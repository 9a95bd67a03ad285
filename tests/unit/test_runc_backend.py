"""The runc backend's risky parts, with real processes and no runc: what a runc create or exec
killed by a deadline leaves behind, and who gets killed for it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from podshim.backends.runc import backend as rb
from podshim.system import reaper
from podshim.system.reaper import Exit

BOUND = 5.0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.mark.usefixtures("installed_reaper")
async def test_a_half_started_process_is_killed_and_its_exit_delivered(tmp_path: Path) -> None:
    """runc wrote the pid file, then the deadline came: the process is ours to kill, and its
    exit reaches the exec layer (the parked exit a cancelled Start delivers)."""
    pid_file = tmp_path / "e.pid"
    with reaper.REAPER.expecting():
        proc, _ = reaper.spawn(["sleep", "100"])
        pid_file.write_text(str(proc.pid))
        got: list[Exit] = []
        assert await asyncio.wait_for(rb._kill_half_started(str(pid_file), got.append), BOUND) == proc.pid
    assert [e.status for e in got] == [137]
    assert not alive(proc.pid)


@pytest.mark.usefixtures("installed_reaper")
async def test_no_pid_file_nothing_to_kill(tmp_path: Path) -> None:
    assert await rb._kill_half_started(str(tmp_path / "none.pid")) == 0


class FakeCgroup:
    def __init__(self, pids: list[int]) -> None:
        self._pids = pids

    def pids(self) -> list[int]:
        return list(self._pids)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    made: list[subprocess.Popen[bytes]] = []
    yield made
    for p in made:
        if p.poll() is None:
            p.kill()
        p.wait()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


async def test_kill_strays_kills_only_the_unknown_newcomer(procs: list[subprocess.Popen[bytes]]) -> None:
    old = subprocess.Popen(["sleep", "100"])  # in the cgroup from before the failed exec
    procs.append(old)
    old_start = rb._stat(old.pid)[1]
    deadline = time.monotonic() + BOUND
    while rb.boot_ticks() <= old_start:  # the next clock tick: "since" is after it started
        assert time.monotonic() < deadline
        time.sleep(0.001)
    since = rb.boot_ticks()
    init = subprocess.Popen(["sh", "-c", "sleep 100 & wait"])
    procs.append(init)
    stray = subprocess.Popen(["sleep", "100"])  # what the killed runc exec was starting
    procs.append(stray)
    deadline = time.monotonic() + BOUND
    while not _children(init.pid):  # the init's own child: a container process, not a stray
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (grandchild,) = _children(init.pid)

    c = rb.RuncContainer.__new__(rb.RuncContainer)
    c.id = "c1"
    c.cgroup = FakeCgroup([old.pid, init.pid, grandchild, stray.pid])  # type: ignore[assignment]
    c.execs = set()
    c.exec_starts = 1
    c.init = type("Init", (), {"pid": init.pid})()  # type: ignore[assignment]
    try:
        await c.kill_strays(since)
        assert stray.wait(BOUND) == -9
        assert old.poll() is None and init.poll() is None and alive(grandchild)
    finally:
        os.kill(grandchild, 9)


async def test_kill_strays_waits_for_a_concurrent_exec_start(procs: list[subprocess.Popen[bytes]]) -> None:
    since = rb.boot_ticks()
    stray = subprocess.Popen(["sleep", "100"])
    procs.append(stray)
    c = rb.RuncContainer.__new__(rb.RuncContainer)
    c.id = "c1"
    c.cgroup = FakeCgroup([stray.pid])  # type: ignore[assignment]
    c.execs = set()
    c.exec_starts = 2  # the other start's process is unknown too, and must not be killed
    c.init = type("Init", (), {"pid": os.getpid()})()  # type: ignore[assignment]
    await c.kill_strays(since)
    assert stray.poll() is None


class GrowingCgroup:
    """A cgroup in which a stray appears only after the first look: what an orphaned
    ``runc init`` does when it forks the workload just after its parent runc was killed."""

    def __init__(self, procs: list[subprocess.Popen[bytes]]) -> None:
        self.procs = procs
        self.looks = 0

    def pids(self) -> list[int]:
        self.looks += 1
        if self.looks == 2:
            self.procs.append(subprocess.Popen(["sleep", "100"]))
        return [p.pid for p in self.procs]


async def test_kill_strays_catches_a_stray_forked_after_the_first_look(
    procs: list[subprocess.Popen[bytes]],
) -> None:
    since = rb.boot_ticks()
    c = rb.RuncContainer.__new__(rb.RuncContainer)
    c.id = "c1"
    c.cgroup = GrowingCgroup(procs)  # type: ignore[assignment]
    c.execs = set()
    c.exec_starts = 1
    c.init = type("Init", (), {"pid": os.getpid()})()  # type: ignore[assignment]
    await c.kill_strays(since)
    (late,) = procs
    assert late.wait(BOUND) == -9, "a stray that forked after the first scan lived on"
