"""The reaper: routing of exits, stale exits of reused pids, and killing children whose caller
gave up (a deadline).  A fake wait4 scripts what the kernel reports; real children only where
the kill itself is what is tested."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from podshim.guest import reaper as guest_reaper
from podshim.system import children, reaper
from podshim.system.reaper import Exit, Reaper

BOUND = 5.0


class FakeKernel:
    """wait4 and pidfd_open over a scripted set of processes."""

    def __init__(self) -> None:
        self.zombies: list[tuple[int, int]] = []  # (pid, wait status) ready to be reaped
        self.live: set[int] = set()

    def wait4(self, pid: int, options: int) -> tuple[int, int, object]:
        if self.zombies:
            zpid, status = self.zombies.pop(0)
            return zpid, status, None
        if self.live:
            return 0, 0, None
        raise ChildProcessError()

    def pidfd_open(self, pid: int) -> int:
        if pid in self.live or any(z == pid for z, _ in self.zombies):
            return os.open(os.devnull, os.O_RDONLY)
        raise ProcessLookupError(pid, "no such process")

    def exit(self, pid: int, code: int) -> None:
        self.live.discard(pid)
        self.zombies.append((pid, code << 8))


def test_exits_go_to_their_claim() -> None:
    k = FakeKernel()
    r = Reaper(k.wait4, k.pidfd_open)
    got: list[Exit] = []
    k.live.add(10)
    r.claim(10, got.append)
    k.exit(10, 3)
    r.reap()
    assert [(e.pid, e.status) for e in got] == [(10, 3)]


def test_an_exit_before_its_claim_is_kept_while_expecting() -> None:
    k = FakeKernel()
    r = Reaper(k.wait4, k.pidfd_open)
    got: list[Exit] = []
    with r.expecting():
        k.live.add(10)
        k.exit(10, 0)
        r.reap()  # the container died before runc wrote its pid file
        r.claim(10, got.append)
    assert [(e.pid, e.status) for e in got] == [(10, 0)]


def test_forced_pid_reuse_a_stale_exit_never_matches_the_new_process() -> None:
    """The defect: an unclaimed exit of an earlier process with the same pid was handed to the
    new one, which then looked dead at once (and was never reaped for real)."""
    k = FakeKernel()
    r = Reaper(k.wait4, k.pidfd_open)
    got: list[Exit] = []
    with r.expecting():
        k.live.add(42)
        k.exit(42, 9)  # an orphan of ours with pid 42 dies while runc create runs
        r.reap()
        k.live.add(42)  # the kernel hands pid 42 to the new container's init
        r.claim(42, got.append)
        assert got == []  # the stale exit is dropped
        k.exit(42, 0)
        r.reap()
    assert [(e.pid, e.status) for e in got] == [(42, 0)]


def test_unclaimed_exits_are_dropped_when_nobody_expects_them() -> None:
    k = FakeKernel()
    r = Reaper(k.wait4, k.pidfd_open)
    with r.expecting():
        k.exit(7, 0)
        r.reap()
    got: list[Exit] = []
    r.claim(7, got.append)
    assert got == []


def test_the_guest_reaper_is_the_shared_one() -> None:
    """The agent, PID 1 of its VM, reaps with the shim's reaper: no second copy whose handling
    of unclaimed exits can drift (the agent's own kept 1,024 of them, stale or not)."""
    assert issubclass(guest_reaper.Reaper, children.Reaper)
    assert issubclass(reaper.Reaper, children.Reaper)


_GUEST_REAPER_SCRIPT = """
import subprocess, threading, time
from podshim.guest.reaper import Reaper

r = Reaper()
r.start()
done = threading.Event()
got = []
pid = r.spawn(["/bin/sh", "-c", "exit 7"], {}, lambda ex: (got.append(ex), done.set()))
assert done.wait(10)
assert (got[0].pid, got[0].status) == (pid, 7), got
seen = []
r.observers.append(seen.append)
stray = subprocess.Popen(["/bin/sh", "-c", "exit 9"])  # nobody claims it, nobody expects it
deadline = time.monotonic() + 10
while stray.pid not in [ex.pid for ex in seen]:
    assert time.monotonic() < deadline, "the reaper thread did not reap the stray child"
    time.sleep(0.01)
late = []
r.claim(stray.pid, late.append)
assert late == [], late  # dropped, not kept for a later holder of the pid
print("ok")
"""


def test_the_guest_reaper_thread_routes_exits_and_drops_unclaimed_ones() -> None:
    """The agent's thread adapter with real children, in a process of its own (it reaps every
    child of its process) on the standard library alone, as in the guest."""
    repo = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [sys.executable, "-S", "-c", _GUEST_REAPER_SCRIPT],
        env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# -- cancellation: Go's exec.CommandContext -------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.usefixtures("installed_reaper")
async def test_a_cancelled_run_kills_its_child(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await reaper.run(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 100"])
    pid = int(pid_file.read_text())
    assert _gone(pid)


@pytest.mark.usefixtures("installed_reaper")
async def test_a_cancelled_wait_kills_and_reaps_the_child() -> None:
    proc, exited = reaper.spawn(["sleep", "100"])
    waiting = asyncio.ensure_future(reaper.wait_or_kill(proc.pid, exited))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    ex = await asyncio.wait_for(exited, BOUND)
    assert ex.status == 128 + 9
