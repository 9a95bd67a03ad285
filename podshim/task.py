"""A task: one container, its init exec and its additional execs (seed: shimTask).

Every event of a task goes out through its ``EventLine``, in the order containerd relies on
(spec §7.14): TaskCreate; TaskStart or TaskExecStarted before that process's TaskExit; the
execs' TaskExits before the init's (runc-v2 holds the init's back until they are out); TaskDelete
last, after which nothing of the task is published.  Only two steps between an exit and its
TaskExit wait on anything (killing the leftovers of a shared pid namespace, and the execs'
exits), and a Delete waits for an exit report in flight before it starts, so no event can
overtake another.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from typing import Any

from podshim import errdefs
from podshim.backends.base import Backend, Container, ContainerRequest
from podshim.events import Event, Publisher, task_events
from podshim.process import LIVE, Exec, ExecState, ExitInfo
from podshim.system.stdio import StdioConfig

log = logging.getLogger(__name__)

S = ExecState
# How long the init's TaskExit waits for its execs' exits, and a Delete for execs it killed.  They
# come at once when the container's pid namespace dies; only a hung backend makes this matter.
EXEC_EXITS_TIMEOUT = 10.0
# How long the Delete of a created (never started) init waits for the exit its removal causes.
CREATED_EXIT_TIMEOUT = 2.0


class Status(enum.IntEnum):
    """containerd.v1.types.Status."""

    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4
    PAUSING = 5


class Pause(enum.Enum):
    NONE = "none"
    PAUSING = "pausing"
    PAUSED = "paused"


class EventLine:
    """One task's events, into the shim's one FIFO publisher, closed by TaskDelete."""

    def __init__(self, task_id: str, publisher: Publisher) -> None:
        self.task_id = task_id
        self._publisher = publisher
        self.closed = False

    def publish(self, event: Event) -> None:
        topic, msg = event
        if self.closed:
            # Every path that could get here is closed by the exec states; say so if one is not.
            log.error("task %s: %s after TaskDelete dropped", self.task_id, topic)
            return
        self._publisher.publish(topic, msg)
        if topic == task_events.DELETE_TOPIC:
            self.closed = True


async def _bounded(aws: list[Any], timeout: float, what: str) -> None:
    if not aws:
        return
    tasks = [asyncio.ensure_future(a) for a in aws]
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    if pending:
        log.warning("%s: %d still pending after %.0f s", what, len(pending), timeout)


class Task:
    def __init__(self, req: ContainerRequest, container: Container, events: Publisher) -> None:
        self.id = req.id
        self.bundle = req.bundle
        self.spec = req.spec
        self.container = container
        self.line = EventLine(self.id, events)
        self.pause_state = Pause.NONE
        self.execs: dict[str, Exec] = {}
        self._reserved: set[str] = set()
        self._reports: set[asyncio.Task[None]] = set()
        self.init = Exec(task_id=self.id, exec_id="", stdio=req.stdio, process=container.init, events=self)

    @classmethod
    async def create(cls, backend: Backend, req: ContainerRequest, events: Publisher) -> Task:
        container = await backend.create_container(req)
        task = cls(req, container, events)
        io = req.stdio
        task.line.publish(
            task_events.create(
                req.id, req.bundle, req.rootfs, io.stdin, io.stdout, io.stderr, io.terminal, task.init.pid
            )
        )
        return task

    # -- the execs' events (process.ExecEvents) ----------------------------------------------------

    def started(self, e: Exec) -> None:
        if e.is_init:
            self.line.publish(task_events.start(self.id, e.pid))
        else:
            self.line.publish(task_events.exec_started(self.id, e.exec_id, e.pid))

    def exit_recorded(self, e: Exec) -> None:
        if not e.is_init:
            self._report_exit(e)
            return
        t = asyncio.get_running_loop().create_task(self._report_init_exit())
        self._reports.add(t)
        t.add_done_callback(self._reports.discard)

    def _report_exit(self, e: Exec) -> None:
        if e.state is not S.EXITING:
            return  # abandoned by its container's Delete meanwhile: nobody is to hear of it
        self.line.publish(task_events.exit(self.id, e.name, e.pid, e.exit_status, e.exited_at))
        e.reported()

    async def _report_init_exit(self) -> None:
        try:
            # Leftovers in a shared pid namespace would hold the stdio pipes open (spec §7.13).
            if self.container.shares_pid_namespace:
                try:
                    await self.container.kill_all(9)
                except Exception:
                    log.exception("killing what is left of %s", self.id)
            await _bounded([x.reported_or_gone() for x in self.execs.values()], EXEC_EXITS_TIMEOUT,
                           f"task {self.id}: exits of execs before the init's")  # fmt: skip
        finally:
            self._report_exit(self.init)

    # -- lookups ---------------------------------------------------------------------------

    def get_exec(self, exec_id: str) -> Exec:
        if not exec_id:
            return self.init
        e = self.execs.get(exec_id)
        if e is None:
            raise errdefs.NotFound(f"process does not exist {exec_id}")
        return e

    def status_of(self, e: Exec) -> Status:
        if e.state in (S.CREATED, S.STARTING, S.STARTING_EXITED, S.START_FAILED):
            return Status.CREATED
        if e.state is S.RUNNING:
            if self.pause_state is Pause.PAUSED:
                return Status.PAUSED
            if self.pause_state is Pause.PAUSING:
                return Status.PAUSING
            return Status.RUNNING
        return Status.STOPPED

    # -- execs ------------------------------------------------------------------------------

    async def create_exec(self, exec_id: str, spec: dict[str, Any], stdio: StdioConfig) -> Exec:
        if not exec_id:
            raise errdefs.InvalidArgument("exec id must not be empty")
        if exec_id in self.execs or exec_id in self._reserved:
            raise errdefs.AlreadyExists(f"id {exec_id}")
        if self.init.state is not S.RUNNING:
            raise errdefs.ShimError(f"cannot exec in a {self.init.noun()} state")
        spec = dict(spec)
        spec["terminal"] = stdio.terminal
        # The id stays reserved across the await, so a concurrent duplicate fails (spec §7.4).
        self._reserved.add(exec_id)
        try:
            process = await self.container.new_exec(exec_id, spec, stdio)
        finally:
            self._reserved.discard(exec_id)
        e = Exec(task_id=self.id, exec_id=exec_id, stdio=stdio, process=process, events=self)
        self.execs[exec_id] = e
        self.line.publish(task_events.exec_added(self.id, exec_id))
        return e

    async def kill(self, exec_id: str, signal: int, all: bool) -> None:
        e = self.get_exec(exec_id)
        if e.is_init and all:
            if e.state in (S.DELETING, S.DELETED):
                raise errdefs.NotFound("cannot kill a deleted process")
            await self.container.kill_all(signal)
            return
        await e.kill(signal)

    async def delete(self, exec_id: str) -> ExitInfo:
        e = self.get_exec(exec_id)
        if e.state is S.EXITING:
            await e.reported_or_gone()  # its TaskExit goes out before anything Delete publishes
        back_to = e.begin_delete()  # synchronous: of two concurrent Deletes, one gets NotFound
        try:
            if e.is_init:
                await self._delete_container()
            info = await e.release()
        except BaseException:
            if e.state is S.DELETING:
                e.delete_failed(back_to)
            raise
        finally:
            if e.is_init and e.state is S.DELETED:
                self.line.publish(task_events.delete(self.id, e.pid, e.exit_status, e.exited_at))
        if not e.is_init and self.execs.get(exec_id) is e:
            del self.execs[exec_id]
        return info

    async def _delete_container(self) -> None:
        # No exec outlives its container: one still running (a shared or host pid namespace)
        # would hold its stdio open, and would report an exit for a task that is gone.
        live = [x for x in self.execs.values() if x.state in LIVE or x.state is S.EXITING]
        for x in live:
            if x.state is S.RUNNING:
                await x.kill_quietly(9)
        await _bounded([x.reported_or_gone() for x in live], EXEC_EXITS_TIMEOUT,
                       f"task {self.id}: exits of execs killed by its Delete")  # fmt: skip
        for x in list(self.execs.values()):
            if x.state in (S.RUNNING, S.EXITING):
                x.abandon()
            elif x.state in (S.CREATED, S.START_FAILED, S.EXITED):
                x.begin_delete()
            else:
                continue  # deleted, or another Delete (or a Start) has it
            await x.release()
        await self.init.process.drain()
        await self.container.delete()
        if self.init.exit is None and self.init.pid:
            # Removing a created container kills its init: report the exit that caused.
            try:
                async with asyncio.timeout(CREATED_EXIT_TIMEOUT):
                    await self.init.recorded()
            except TimeoutError:
                log.warning("task %s: no exit of its init %d after its removal", self.id, self.init.pid)

    # -- container-wide ----------------------------------------------------------------------

    async def pause(self) -> None:
        if self.init.state is S.CREATED:
            raise errdefs.ShimError("cannot pause task in created state")
        if self.init.state is not S.RUNNING:
            raise errdefs.ShimError("cannot pause a stopped container")
        if self.pause_state is not Pause.NONE:
            raise errdefs.ShimError("cannot pause a paused container")
        self.pause_state = Pause.PAUSING
        try:
            await self.container.pause()
        except BaseException:
            self.pause_state = Pause.NONE
            raise
        self.pause_state = Pause.PAUSED
        self.line.publish(task_events.paused(self.id))

    async def resume(self) -> None:
        if self.pause_state is not Pause.PAUSED:
            raise errdefs.ShimError(f"cannot resume a {self.init.noun()} process")
        await self.container.resume()
        self.pause_state = Pause.NONE
        self.line.publish(task_events.resumed(self.id))

    async def update(self, resources_json: bytes) -> None:
        if self.init.state in (S.EXITING, S.EXITED, S.DELETING, S.DELETED):
            raise errdefs.ShimError("cannot update a stopped container")
        try:
            json.loads(resources_json or b"{}")
        except ValueError as e:
            raise errdefs.ShimError(str(e)) from e
        await self.container.update(resources_json)

    async def pids(self) -> list[tuple[int, str]]:
        """(pid, exec id or "") for every process of the container."""
        by_pid = {e.pid: e.exec_id for e in self.execs.values() if e.pid}
        return [(pid, by_pid.get(pid, "")) for pid in await self.container.pids()]

    async def stats(self) -> tuple[str, bytes]:
        return await self.container.stats()

    async def wait_all_exited(self) -> None:
        await asyncio.gather(self.init.wait(), *(e.wait() for e in self.execs.values()))
