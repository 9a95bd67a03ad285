"""One exec's state machine: created -> running -> exited -> deleted (spec §7, seed §2).

The init process of a task and its additional execs share this machine; the differences
(which start event, whether an exited init first kills leftovers) are parameters.  Error
kinds follow runc-v2, which containerd and CRI rely on: NotFound and AlreadyExists are
classified, state-machine violations are Unknown (spec §7.11).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from podshim import errdefs
from podshim.backends.base import Process, ProcessGone
from podshim.events import Publisher, task_events
from podshim.system.stdio import StdioConfig

log = logging.getLogger(__name__)


class ExecState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    DELETED = "deleted"


@dataclass(frozen=True)
class ExitInfo:
    pid: int
    status: int
    exited_at: float | None  # None: not exited (the Go zero time on the wire)


class Exec:
    def __init__(
        self,
        *,
        task_id: str,
        exec_id: str,
        stdio: StdioConfig,
        process: Process,
        events: Publisher,
        before_exit_event: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.task_id = task_id
        self.exec_id = exec_id  # "" for the init process
        self.stdio = stdio
        self.process = process
        self.events = events
        self._before_exit_event = before_exit_event
        self.state = ExecState.CREATED
        self.pid = process.pid if self.is_init else 0
        self.exit_status = 0
        self.exited_at: float | None = None
        self._done = asyncio.Event()
        self._starting = False
        self._early_exit: tuple[int, float] | None = None
        process.on_exit(self._on_exit)

    @property
    def is_init(self) -> bool:
        return self.exec_id == ""

    @property
    def name(self) -> str:
        return self.exec_id or self.task_id

    # -- transitions ----------------------------------------------------------------------

    async def start(self) -> int:
        if self.state is not ExecState.CREATED or self._starting:
            raise errdefs.ShimError(f"cannot start a {self._noun()} process")
        self._starting = True
        try:
            pid = await self.process.start()
        except Exception as e:
            self._starting = False
            if not self.is_init:
                # runc-v2: a failed exec start releases a pending Wait with status 0 and zero
                # time, and leaves the exec CREATED so that it can be deleted (spec §7.4).
                self._done.set()
            if isinstance(e, errdefs.ShimError):
                raise
            raise errdefs.ShimError(f"failed to start {self.name}: {e}") from e
        self.pid = pid
        self.state = ExecState.RUNNING
        if self.is_init:
            self.events.publish(*task_events.start(self.task_id, pid))
        else:
            self.events.publish(*task_events.exec_started(self.task_id, self.exec_id, pid))
        self._starting = False
        if self._early_exit is not None:
            self._finish(*self._early_exit)
        return pid

    def _on_exit(self, status: int, at: float) -> None:
        if self._starting:
            # The start event must be queued before the exit event (spec §7.14).
            self._early_exit = (status, at)
        else:
            self._finish(status, at)

    def _finish(self, status: int, at: float) -> None:
        asyncio.get_running_loop().create_task(self._exited(status, at))

    async def _exited(self, status: int, at: float) -> None:
        if self._before_exit_event is not None:
            try:
                await self._before_exit_event()
            except Exception:
                log.exception("cleaning up after %s exited", self.name)
        self.exit_status = status
        self.exited_at = at
        if self.state is not ExecState.DELETED:
            self.state = ExecState.EXITED
        self._done.set()
        self.events.publish(*task_events.exit(self.task_id, self.name, self.pid, status, at))

    async def kill(self, signal: int) -> None:
        st = self.state
        if st is ExecState.DELETED:
            raise errdefs.NotFound("cannot kill a deleted process")
        if st is ExecState.EXITED:
            raise errdefs.NotFound("process already finished")
        if st is ExecState.CREATED and not self.is_init and not self.pid:
            raise errdefs.FailedPrecondition("process not created")
        try:
            await self.process.kill(signal)
        except ProcessGone as e:
            raise errdefs.NotFound("process already finished") from e

    async def wait(self) -> ExitInfo:
        await self._done.wait()
        return self.exit_info()

    def exit_info(self) -> ExitInfo:
        return ExitInfo(self.pid, self.exit_status, self.exited_at)

    def check_deletable(self) -> None:
        if self.state is ExecState.DELETED:
            raise errdefs.NotFound(f"process {self.name} not found")
        if self.state is ExecState.RUNNING:
            raise errdefs.ShimError("cannot delete a running process")

    async def release(self) -> ExitInfo:
        """Delete: wait for output to drain, then free stdio.  The caller checked deletability."""
        await self.process.drain()
        await self.process.close()
        self.state = ExecState.DELETED
        return self.exit_info()

    def resize(self, width: int, height: int) -> None:
        if self.state in (ExecState.EXITED, ExecState.DELETED) and self.stdio.terminal:
            raise errdefs.ShimError("cannot resize a stopped container")
        self.process.resize(width, height)

    def close_stdin(self) -> None:
        self.process.close_stdin()

    def _noun(self) -> str:
        return {
            ExecState.CREATED: "created",
            ExecState.RUNNING: "running",
            ExecState.EXITED: "stopped",
            ExecState.DELETED: "deleted",
        }[self.state]
