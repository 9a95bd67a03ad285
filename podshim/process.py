"""One exec's state machine (spec §7, seed §2; containerd's ``pkg/process`` states).

The init process of a task and its additional execs share this machine.  Every state is a
member of ``ExecState``, and every legal move is one row of ``TRANSITIONS``: there is no flag
beside the state.  "Start in flight", "an exit that came while Start was in flight" and "Delete
in flight" are states of their own, so a concurrent Start, Delete or exit sees exactly where the
exec is, and a cancelled Start (a deadline) still ends in a state Delete can clean up.

Exits are recorded the moment the reaper reports them (``EXITING``: State already says
stopped).  Reporting them (TaskExit, releasing Wait) is the task's job, through its one event
line (``podshim.task``), which knows what has to go out first.

Error kinds follow runc-v2, which containerd and CRI rely on: NotFound and AlreadyExists are
classified, state-machine violations are Unknown (spec §7.11).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from podshim import errdefs
from podshim.backends.base import Process, ProcessGone
from podshim.system.stdio import StdioConfig

log = logging.getLogger(__name__)


class ExecState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"  # Start in flight
    STARTING_EXITED = "starting, exited"  # the exit is parked until Start has published its event
    RUNNING = "running"
    START_FAILED = "start failed"  # Start raised or was cancelled; nothing of it runs (or it is killed)
    EXITING = "exiting"  # exit recorded; TaskExit and Wait pending (leftovers, execs' exits first)
    EXITED = "exited"  # exit reported
    DELETING = "deleting"  # Delete in flight
    DELETED = "deleted"


class Move(enum.Enum):
    START = "start"
    STARTED = "started"
    START_FAILED = "start failed"
    EXIT = "exit"
    REPORTED = "exit reported"
    DELETE = "delete"
    DELETE_FAILED = "delete failed"
    DELETED = "deleted"
    ABANDON = "abandon"  # its container is being deleted under it


S, M = ExecState, Move

TRANSITIONS: dict[ExecState, dict[Move, frozenset[ExecState]]] = {
    S.CREATED: {
        M.START: frozenset({S.STARTING}),
        M.EXIT: frozenset({S.EXITING}),  # killed before it ever started
        M.DELETE: frozenset({S.DELETING}),
    },
    S.STARTING: {
        M.STARTED: frozenset({S.RUNNING}),
        M.START_FAILED: frozenset({S.START_FAILED}),
        M.EXIT: frozenset({S.STARTING_EXITED}),
    },
    S.STARTING_EXITED: {
        # Start's outcome decides only which event goes out first; the exit then is reported.
        M.STARTED: frozenset({S.EXITING}),
        M.START_FAILED: frozenset({S.EXITING}),
    },
    S.RUNNING: {
        M.EXIT: frozenset({S.EXITING}),
        M.ABANDON: frozenset({S.DELETING}),
    },
    S.START_FAILED: {
        M.EXIT: frozenset({S.EXITING}),  # what a failed Start killed, or what runc killed
        M.DELETE: frozenset({S.DELETING}),
    },
    S.EXITING: {
        M.REPORTED: frozenset({S.EXITED}),
        M.ABANDON: frozenset({S.DELETING}),
    },
    S.EXITED: {
        M.DELETE: frozenset({S.DELETING}),
    },
    S.DELETING: {
        M.EXIT: frozenset({S.DELETING}),  # recorded for the Delete reply, never published
        M.DELETED: frozenset({S.DELETED}),
        M.DELETE_FAILED: frozenset({S.CREATED, S.START_FAILED, S.EXITED}),  # back where it was
    },
    S.DELETED: {
        M.EXIT: frozenset({S.DELETED}),
    },
}

# What each state is to the outside world.
_NOUN = {
    S.CREATED: "created", S.STARTING: "starting", S.STARTING_EXITED: "starting", S.RUNNING: "running",
    S.START_FAILED: "created", S.EXITING: "stopped", S.EXITED: "stopped", S.DELETING: "deleted",
    S.DELETED: "deleted",
}  # fmt: skip
LIVE = frozenset({S.STARTING, S.STARTING_EXITED, S.RUNNING})
"""States in which the process may run: Delete refuses them."""


class IllegalMove(errdefs.ShimError):
    """A move the table does not have: a bug in the caller, reported as Unknown."""


@dataclass(frozen=True)
class ExitInfo:
    pid: int
    status: int
    exited_at: float | None  # None: not exited (the Go zero time on the wire)


class ExecEvents(Protocol):
    """The task's event line, as an exec sees it (``podshim.task``)."""

    def started(self, e: Exec) -> None:
        """Start succeeded: publish its event (before the exit, if one is parked)."""

    def exit_recorded(self, e: Exec) -> None:
        """An exit to report was recorded: report it (TaskExit, then ``e.reported()``) when
        whatever must go out first is out."""


class Exec:
    def __init__(
        self,
        *,
        task_id: str,
        exec_id: str,
        stdio: StdioConfig,
        process: Process,
        events: ExecEvents,
    ) -> None:
        self.task_id = task_id
        self.exec_id = exec_id  # "" for the init process
        self.stdio = stdio
        self.process = process
        self._events = events
        self.state = ExecState.CREATED
        self.pid = process.pid if self.is_init else 0
        self.exit: ExitInfo | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._killing: asyncio.Task[None] | None = None  # held: the loop keeps only weak references
        process.on_exit(self._exited)

    @property
    def is_init(self) -> bool:
        return self.exec_id == ""

    @property
    def name(self) -> str:
        return self.exec_id or self.task_id

    @property
    def exit_status(self) -> int:
        return self.exit.status if self.exit is not None else 0

    @property
    def exited_at(self) -> float | None:
        return self.exit.exited_at if self.exit is not None else None

    def noun(self) -> str:
        return _NOUN[self.state]

    # -- the table ----------------------------------------------------------------------------

    def _move(self, move: Move, to: ExecState | None = None) -> ExecState:
        targets = TRANSITIONS[self.state].get(move, frozenset())
        if to is None and len(targets) == 1:
            (to,) = targets
        if to is None or to not in targets:
            raise IllegalMove(f"{self.name}: no move {move.value!r} from {self.state.value!r} to {to}")
        self.state = to
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)
        return to

    async def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            w: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(w)
            await w

    # -- Start ----------------------------------------------------------------------------------

    async def start(self) -> int:
        if self.state is not S.CREATED:
            raise errdefs.ShimError(f"cannot start a {self.noun()} process")
        self._move(M.START)
        try:
            pid = await self.process.start()
        except BaseException as e:  # a deadline's CancelledError too: never leave STARTING
            self._start_failed(e)
            if isinstance(e, errdefs.ShimError | asyncio.CancelledError) or not isinstance(e, Exception):
                raise
            raise errdefs.ShimError(f"failed to start {self.name}: {e}") from e
        self.pid = pid
        to = self._move(M.STARTED)
        self._events.started(self)
        if to is S.EXITING:
            self._events.exit_recorded(self)  # the parked exit, now that the start event is out
        return pid

    def _start_failed(self, e: BaseException) -> None:
        log.info("start of %s failed: %r", self.name, e)
        if self._move(M.START_FAILED) is S.EXITING:
            self._events.exit_recorded(self)  # the parked exit is delivered, not dropped
        elif self.process.pid:
            # A process whose start failed half way (a deadline) may be running, or waiting in
            # runc init: nothing may outlive a failed Start, and its exit is what Wait and Delete
            # then see.
            self._killing = asyncio.get_running_loop().create_task(self.kill_quietly(9))

    async def kill_quietly(self, signal: int) -> None:
        try:
            await self.process.kill(signal)
        except ProcessGone:
            pass
        except Exception:
            log.exception("killing %s after a failed start", self.name)

    # -- exits ------------------------------------------------------------------------------------

    def _exited(self, status: int, at: float) -> None:
        """The backend's exit callback: called once, synchronously, when the exit is known."""
        if M.EXIT not in TRANSITIONS[self.state]:
            log.error("%s: exit %d in state %s ignored", self.name, status, self.state.value)
            return
        self.exit = ExitInfo(self.pid, status, at)
        report = self.state in (S.CREATED, S.RUNNING, S.START_FAILED)
        self._move(M.EXIT)
        if report:
            self._events.exit_recorded(self)

    def reported(self) -> None:
        """The task's event line has published this exit: Wait may return."""
        self._move(M.REPORTED)

    def _wait_over(self) -> bool:
        st = self.state
        if st in (S.EXITED, S.DELETING, S.DELETED):
            return True
        # runc-v2: a failed exec start releases Wait with status 0 and zero time (spec §7.4).
        # A process that did come to exist was killed by the failed Start: Wait returns its exit.
        return st is S.START_FAILED and not self.process.pid

    async def wait(self) -> ExitInfo:
        await self._until(self._wait_over)
        return self.exit_info()

    async def recorded(self) -> None:
        """Until an exit is recorded."""
        await self._until(lambda: self.exit is not None)

    async def reported_or_gone(self) -> None:
        """Until this exec's exit is out, or it can have none (never started, deleted)."""
        await self._until(lambda: self.state not in LIVE and self.state is not S.EXITING)

    def exit_info(self) -> ExitInfo:
        return ExitInfo(self.pid, self.exit_status, self.exited_at)

    # -- Kill -----------------------------------------------------------------------------------

    async def kill(self, signal: int) -> None:
        st = self.state
        if st in (S.DELETING, S.DELETED):
            raise errdefs.NotFound("cannot kill a deleted process")
        if st in (S.EXITING, S.EXITED, S.STARTING_EXITED):
            raise errdefs.NotFound("process already finished")
        if not self.is_init and not self.pid:
            raise errdefs.FailedPrecondition("process not created")
        try:
            await self.process.kill(signal)
        except ProcessGone as e:
            raise errdefs.NotFound("process already finished") from e

    # -- Delete -----------------------------------------------------------------------------------

    def begin_delete(self) -> ExecState:
        """Claim the exec for one Delete; returns the state to go back to if it fails."""
        st = self.state
        if st in (S.DELETING, S.DELETED):
            raise errdefs.NotFound(f"process {self.name} not found")
        if st in LIVE:
            raise errdefs.ShimError("cannot delete a running process")
        if st is S.EXITING:
            raise IllegalMove("the caller waits for the exit report before deleting")
        self._move(M.DELETE)
        return st

    def abandon(self) -> None:
        """Its container is being deleted: this exec goes with it, running or not; an exit
        still to come is recorded, never published."""
        self._move(M.ABANDON)

    def delete_failed(self, back_to: ExecState) -> None:
        self._move(M.DELETE_FAILED, back_to)

    async def release(self) -> ExitInfo:
        """Delete's last step: wait for output to drain, free stdio, and be gone."""
        try:
            await self.process.drain()
        finally:
            await self.process.close()
            self._move(M.DELETED)
        return self.exit_info()

    # -- stdio ------------------------------------------------------------------------------------

    def resize(self, width: int, height: int) -> None:
        if self.state in (S.EXITING, S.EXITED, S.DELETING, S.DELETED) and self.stdio.terminal:
            raise errdefs.ShimError("cannot resize a stopped container")
        self.process.resize(width, height)

    def close_stdin(self) -> None:
        self.process.close_stdin()
