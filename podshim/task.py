"""A task: one container, its init exec and its additional execs (seed: shimTask)."""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from typing import Any

from podshim import errdefs
from podshim.backends.base import Backend, Container, ContainerRequest
from podshim.events import Publisher, task_events
from podshim.process import Exec, ExecState, ExitInfo
from podshim.system.stdio import StdioConfig

log = logging.getLogger(__name__)


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


class Task:
    def __init__(self, req: ContainerRequest, container: Container, events: Publisher) -> None:
        self.id = req.id
        self.bundle = req.bundle
        self.spec = req.spec
        self.container = container
        self.events = events
        self.pause_state = Pause.NONE
        self.execs: dict[str, Exec] = {}
        self._reserved: set[str] = set()
        self.init = Exec(
            task_id=self.id,
            exec_id="",
            stdio=req.stdio,
            process=container.init,
            events=events,
            before_exit_event=self._init_exited,
        )

    @classmethod
    async def create(cls, backend: Backend, req: ContainerRequest, events: Publisher) -> Task:
        container = await backend.create_container(req)
        task = cls(req, container, events)
        io = req.stdio
        events.publish(
            *task_events.create(
                req.id, req.bundle, req.rootfs, io.stdin, io.stdout, io.stderr, io.terminal, task.init.pid
            )
        )
        return task

    async def _init_exited(self) -> None:
        # Leftovers in a shared pid namespace would hold the stdio pipes open (spec §7.13).
        if self.container.shares_pid_namespace:
            await self.container.kill_all(9)

    # -- lookups ---------------------------------------------------------------------------

    def get_exec(self, exec_id: str) -> Exec:
        if not exec_id:
            return self.init
        e = self.execs.get(exec_id)
        if e is None:
            raise errdefs.NotFound(f"process does not exist {exec_id}")
        return e

    def status_of(self, e: Exec) -> Status:
        if e.state is ExecState.CREATED:
            return Status.CREATED
        if e.state is ExecState.RUNNING:
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
        if self.init.state is not ExecState.RUNNING:
            raise errdefs.ShimError(f"cannot exec in a {self.init._noun()} state")
        spec = dict(spec)
        spec["terminal"] = stdio.terminal
        # The id stays reserved across the await, so a concurrent duplicate fails (spec §7.4).
        self._reserved.add(exec_id)
        try:
            process = await self.container.new_exec(exec_id, spec, stdio)
        finally:
            self._reserved.discard(exec_id)
        e = Exec(task_id=self.id, exec_id=exec_id, stdio=stdio, process=process, events=self.events)
        self.execs[exec_id] = e
        self.events.publish(*task_events.exec_added(self.id, exec_id))
        return e

    async def kill(self, exec_id: str, signal: int, all: bool) -> None:
        e = self.get_exec(exec_id)
        if e.is_init and all:
            if e.state is ExecState.DELETED:
                raise errdefs.NotFound("cannot kill a deleted process")
            await self.container.kill_all(signal)
            return
        await e.kill(signal)

    async def delete(self, exec_id: str) -> ExitInfo:
        e = self.get_exec(exec_id)
        e.check_deletable()
        if not e.is_init:
            info = await e.release()
            self.execs.pop(exec_id, None)
            return info
        for x in list(self.execs.values()):
            if x.state is not ExecState.RUNNING:
                await x.release()
        await e.process.drain()
        await self.container.delete()
        info = await e.release()
        self.events.publish(*task_events.delete(self.id, info.pid, info.status, info.exited_at))
        return info

    # -- container-wide ----------------------------------------------------------------------

    async def pause(self) -> None:
        if self.init.state is ExecState.CREATED:
            raise errdefs.ShimError("cannot pause task in created state")
        if self.init.state is not ExecState.RUNNING:
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
        self.events.publish(*task_events.paused(self.id))

    async def resume(self) -> None:
        if self.pause_state is not Pause.PAUSED:
            raise errdefs.ShimError(f"cannot resume a {self.init._noun()} process")
        await self.container.resume()
        self.pause_state = Pause.NONE
        self.events.publish(*task_events.resumed(self.id))

    async def update(self, resources_json: bytes) -> None:
        if self.init.state in (ExecState.EXITED, ExecState.DELETED):
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
