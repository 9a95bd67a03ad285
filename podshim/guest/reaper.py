"""The agent's reaper: :class:`podshim.system.children.Reaper`, the shim's own, run by a thread.

Being PID 1, the agent reaps every orphan.  The thread blocks in ``waitid(WNOWAIT)`` until some
child has exited, without collecting it, then lets the shared reaper collect and route every
exit; nothing else waits for a child, so no status is lost to a racing ``waitpid``.
"""

from __future__ import annotations

import os
import threading
import traceback
from collections.abc import Callable

from podshim.guest.log import log
from podshim.guest.paths import ENV
from podshim.system import children
from podshim.system.children import Exit
from podshim.system.fds import close_fds


class Reaper(children.Reaper):
    def __init__(self) -> None:
        super().__init__()
        self._children = threading.Condition()

    def start(self) -> None:
        threading.Thread(target=self._run, name="reaper", daemon=True).start()

    def spawn(self, argv: list[str], fds: dict[int, int], on_exit: Callable[[Exit], None]) -> int:
        """posix_spawn with exactly ``fds`` (child fd -> ours); ``on_exit`` gets its exit."""
        return self.track(lambda: children.spawn_with_fds(argv, fds, ENV), on_exit)

    def track(self, start: Callable[[], int], on_exit: Callable[[Exit], None]) -> int:
        """Run ``start`` (which makes a child and returns its pid) and send its exit to ``on_exit``."""
        # The reaper thread may collect the child before the claim: keep its exit till then.
        with self.expecting():
            pid = start()
            self.claim(pid, on_exit)
        with self._children:
            self._children.notify_all()
        return pid

    def _run(self) -> None:
        while True:
            try:
                os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                with self._children:
                    self._children.wait(0.5)
                continue
            except InterruptedError:
                continue
            try:
                self.reap()
            except Exception:
                log(f"reaping failed:\n{traceback.format_exc()}")


REAPER = Reaper()


def run(argv: list[str], fds: dict[int, int] | None = None, capture: bool = False) -> tuple[int, bytes]:
    """Run a helper to completion; with ``capture``, collect its stdout."""
    fds = dict(fds or {})
    r = w = -1
    if capture:
        r, w = os.pipe()
        fds[1] = w
    done = threading.Event()
    result: list[Exit] = []

    def got(ex: Exit) -> None:
        result.append(ex)
        done.set()

    try:
        REAPER.spawn(argv, fds, got)
    finally:
        close_fds(w)
    out = b""
    if capture:
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        close_fds(r)
        out = b"".join(chunks)
    done.wait()
    return result[0].status, out
