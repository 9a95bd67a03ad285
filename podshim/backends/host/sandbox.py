"""The sandbox of a host-process pod: a task with no process (seed: wcowPodSandboxExec).

It moves created → running → exited like a real init: Start makes it running, any Kill ends it
(status 1 if it never started, 0 if it ran), and Wait blocks until then.  Nothing can be exec'd
into it.

Its pid: the seed reports 1, but containerd's CRI plugin uses the sandbox pid for
``/proc/<pid>/ns/*`` paths.  We report the shim's own pid: a real process that lives exactly as
long as the pod and whose namespaces are the host's, which is what a host-process pod's
containers share.  No holder process is needed.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from podshim import errdefs
from podshim.backends.base import Container, ContainerRequest, ExitCallback, Process, ProcessGone
from podshim.system.stdio import StdioConfig


class SandboxProcess(Process):
    def __init__(self) -> None:
        self._callback: ExitCallback | None = None
        self._exited: tuple[int, float] | None = None
        self._started = False

    def on_exit(self, callback: ExitCallback) -> None:
        self._callback = callback

    async def start(self) -> int:
        self._started = True
        self.pid = os.getpid()
        return self.pid

    async def kill(self, signal: int) -> None:
        if self._exited is not None:
            raise ProcessGone()
        self._exited = (0 if self._started else 1, time.time())
        if self._callback is not None:
            self._callback(*self._exited)

    def resize(self, width: int, height: int) -> None:
        raise errdefs.FailedPrecondition("the sandbox of a host-process pod has no tty")

    def close_stdin(self) -> None:
        pass

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        pass


class SandboxHolder(Container):
    def __init__(self, req: ContainerRequest) -> None:
        self.id = req.id
        self.init = SandboxProcess()

    @property
    def shares_pid_namespace(self) -> bool:
        return False  # nothing runs in it: there are no leftovers to kill

    async def new_exec(self, exec_id: str, process_spec: dict[str, Any], stdio: StdioConfig) -> Process:
        raise errdefs.NotImplementedErr("exec into the sandbox of a host-process pod")

    async def kill_all(self, signal: int) -> None:
        with contextlib.suppress(ProcessGone):
            await self.init.kill(signal)

    async def pause(self) -> None:
        raise errdefs.NotImplementedErr("pausing the sandbox of a host-process pod")

    async def resume(self) -> None:
        raise errdefs.NotImplementedErr("resuming the sandbox of a host-process pod")

    async def update(self, resources_json: bytes) -> None:
        pass  # no process, no cgroup: nothing to limit

    async def pids(self) -> list[int]:
        return []

    async def stats(self) -> tuple[str, bytes]:
        raise errdefs.NotFound("cgroup does not exist")  # CRI skips NotFound silently

    async def delete(self) -> None:
        pass
