"""The agent's one reaper: being PID 1, the agent reaps every orphan; one reaper thread owns
``wait4(-1)`` and nothing else waits for a child, so no exit status is lost to a racing
``waitpid``."""

from __future__ import annotations

import collections
import os
import threading
import traceback
from collections.abc import Callable

from podshim.guest.fds import _close
from podshim.guest.log import log
from podshim.guest.paths import ENV

UNCLAIMED_KEEP = 1024


def exit_code(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)


def _names_a_process(pid: int) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    os.close(fd)
    return True


class Reaper:
    """The only waiter: reaps every child and orphan, hands each status to whoever claimed it."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._claims: dict[int, Callable[[int], None]] = {}
        # Exits that came before their claim (a container that dies while runc create runs).
        self._unclaimed: collections.OrderedDict[int, int] = collections.OrderedDict()

    def start(self) -> None:
        threading.Thread(target=self._run, name="reaper", daemon=True).start()

    def spawn(self, argv: list[str], fds: dict[int, int]) -> int:
        """posix_spawn with exactly ``fds`` (child fd -> ours) and /dev/null for missing 0-2."""
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            actions = [(os.POSIX_SPAWN_DUP2, fds.get(i, devnull), i) for i in (0, 1, 2)]
            actions += [(os.POSIX_SPAWN_DUP2, ours, theirs) for theirs, ours in fds.items() if theirs > 2]
            pid = os.posix_spawn(argv[0], argv, ENV, file_actions=actions)
        finally:
            os.close(devnull)
        with self._lock:
            self._lock.notify_all()
        return pid

    def claim(self, pid: int, callback: Callable[[int], None]) -> None:
        with self._lock:
            status = self._unclaimed.pop(pid, None)
            if status is not None and _names_a_process(pid):
                # A former holder's exit: a pid is reused only after its zombie is reaped, so a
                # pid that names a process now names the one being claimed.
                status = None
            if status is None:
                self._claims[pid] = callback
                return
        callback(status)

    def wait(self, pid: int) -> int:
        done = threading.Event()
        result: list[int] = []

        def got(status: int) -> None:
            result.append(status)
            done.set()

        self.claim(pid, got)
        done.wait()
        return result[0]

    def _run(self) -> None:
        while True:
            try:
                pid, status, _ = os.wait4(-1, 0)
            except ChildProcessError:
                with self._lock:
                    self._lock.wait(0.5)
                continue
            except InterruptedError:
                continue
            code = exit_code(status)
            with self._lock:
                cb = self._claims.pop(pid, None)
                if cb is None:
                    self._unclaimed[pid] = code
                    while len(self._unclaimed) > UNCLAIMED_KEEP:
                        self._unclaimed.popitem(last=False)
            if cb is not None:
                try:
                    cb(code)
                except Exception:
                    log(f"exit callback for {pid} failed:\n{traceback.format_exc()}")


REAPER = Reaper()


def run(argv: list[str], fds: dict[int, int] | None = None, capture: bool = False) -> tuple[int, bytes]:
    """Run a helper to completion; with ``capture``, collect its stdout."""
    fds = dict(fds or {})
    r = w = -1
    if capture:
        r, w = os.pipe()
        fds[1] = w
    try:
        pid = REAPER.spawn(argv, fds)
    finally:
        _close(w)
    out = b""
    if capture:
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        _close(r)
        out = b"".join(chunks)
    return REAPER.wait(pid), out
