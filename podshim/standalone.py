"""Standalone tasks: containers with no pod annotations, as ``ctr run`` makes them.

Usually one per shim; several when containerd's runc group annotation puts them together.
"""

from __future__ import annotations

from podshim import errdefs, oci
from podshim.backends.base import Backend, ContainerRequest
from podshim.events import Publisher
from podshim.oci import ContainerType
from podshim.process import ExitInfo
from podshim.task import Task


class Standalone:
    def __init__(self, backend: Backend, events: Publisher) -> None:
        self.backend = backend
        self.events = events
        self.tasks: dict[str, Task] = {}
        self._creating: set[str] = set()

    async def create_task(self, req: ContainerRequest) -> Task:
        kind, _ = oci.sandbox_type_and_id(req.spec)
        if kind is not ContainerType.NONE:
            raise errdefs.FailedPrecondition(
                f"cannot create a '{kind.value}' container in a shim of standalone tasks"
            )
        if req.id in self.tasks or req.id in self._creating:
            raise errdefs.AlreadyExists(f"task {req.id}")
        self._creating.add(req.id)
        try:
            task = await Task.create(self.backend, req, self.events)
        finally:
            self._creating.discard(req.id)
        self.tasks[req.id] = task
        return task

    def get_task(self, tid: str) -> Task:
        task = self.tasks.get(tid)
        if task is None:
            raise errdefs.NotFound("container not created")
        return task

    def list_tasks(self) -> list[Task]:
        return list(self.tasks.values())

    async def kill_task(self, tid: str, eid: str, signal: int, all: bool) -> None:
        await self.get_task(tid).kill(eid, signal, all and not eid)

    async def delete_task(self, tid: str) -> ExitInfo:
        info = await self.get_task(tid).delete("")
        self.tasks.pop(tid, None)
        return info

    @property
    def alive(self) -> bool:
        return bool(self.tasks)

    async def close(self) -> None:
        await self.backend.close()
