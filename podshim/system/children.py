"""Reaping children, shared by the shim and the guest agent (standard library only, no asyncio).

One object owns ``wait4``: :meth:`Reaper.reap` collects every exited child without blocking and
routes each status to whoever claimed that pid.  Nothing else may wait for a child: a second
waiter loses exit codes.  How ``reap`` gets called is the caller's business: the shim calls it
from its event loop's SIGCHLD handler (:mod:`podshim.system.reaper`), the guest agent, PID 1
of its VM, from a thread of its own (:mod:`podshim.guest.reaper`).

An exit nobody has claimed yet is kept only while someone is ``expecting`` one (runc create or
exec, until the pid file is read); otherwise it is dropped at once, so a reused pid can never
be matched with an exit of its former holder.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple


def exit_code(wait_status: int) -> int:
    """Exit code as containerd reports it: a death by signal N is 128 + N."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)


class Exit(NamedTuple):
    pid: int
    status: int
    at: float  # time.time() when reaped: what containerd stores as exited_at


ExitCallback = Callable[[Exit], None]
WaitFn = Callable[[int, int], tuple[int, int, object]]
PidfdOpenFn = Callable[[int], int]


def names_a_process(pid: int, pidfd_open: PidfdOpenFn = os.pidfd_open) -> bool:
    """Whether ``pid`` names a process right now (running, or a zombie nobody reaped yet).

    A pidfd refers to the process the pid names at the moment it is opened, so unlike
    ``kill(pid, 0)`` this cannot be fooled into a yes by something that is not a process."""
    try:
        fd = pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EINVAL (not a thread-group leader) and the like: something lives there
    os.close(fd)
    return True


class Reaper:
    """Claims and exits.  Thread-safe: callbacks run outside the lock, in the reaping thread (or
    in the claiming one, for an exit that came first)."""

    def __init__(self, wait4: WaitFn = os.wait4, pidfd_open: PidfdOpenFn = os.pidfd_open) -> None:
        self._wait4 = wait4
        self._pidfd_open = pidfd_open
        self._lock = threading.Lock()
        self._claims: dict[int, ExitCallback] = {}
        # Exits of pids nobody has claimed yet, kept only while a claim may still come
        # (a container that exits before its pid file is read).
        self._unclaimed: dict[int, Exit] = {}
        self._expecting = 0
        self.observers: list[ExitCallback] = []

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Keep unclaimed exits while the caller learns a pid (runc create/exec, pid files)."""
        with self._lock:
            self._expecting += 1
        try:
            yield
        finally:
            with self._lock:
                self._expecting -= 1
                if self._expecting == 0:
                    self._unclaimed.clear()

    def claim(self, pid: int, callback: ExitCallback) -> None:
        """Route pid's exit to callback, also one reaped earlier while ``expecting``.

        An exit kept for pid may be a former holder's: a process of ours that exited, was
        reaped, and whose pid the kernel then gave to the process being claimed now.  A pid is
        only reused once its zombie is reaped, so while pid still names a process, that
        process is the one being claimed and the kept exit is stale."""
        with self._lock:
            early = self._unclaimed.pop(pid, None)
            if early is not None and names_a_process(pid, self._pidfd_open):
                early = None
            if early is None:
                self._claims[pid] = callback
                return
        callback(early)

    def unclaim(self, pid: int) -> None:
        with self._lock:
            self._claims.pop(pid, None)

    def reap(self) -> None:
        """Collect every child that has exited, without blocking."""
        while True:
            try:
                pid, status, _ = self._wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            ex = Exit(pid, exit_code(status), time.time())
            with self._lock:
                cb = self._claims.pop(pid, None)
                if cb is None and self._expecting:
                    self._unclaimed[pid] = ex
            if cb is not None:
                cb(ex)
            for obs in self.observers:
                obs(ex)


def spawn_with_fds(argv: Sequence[str], fds: Mapping[int, int], env: Mapping[str, str] | None = None) -> int:
    """posix_spawn a child with exactly the descriptors in ``fds`` (child fd -> ours), plus
    /dev/null for any of 0-2 not given.  Everything of ours is close-on-exec, so nothing else
    leaks.  The caller claims the returned pid (before it next lets its reaper run)."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, fds.get(i, devnull), i) for i in (0, 1, 2)]
        actions += [(os.POSIX_SPAWN_DUP2, ours, theirs) for theirs, ours in fds.items() if theirs > 2]
        return os.posix_spawn(argv[0], list(argv), dict(env or {}), file_actions=actions)
    finally:
        os.close(devnull)
