"""The pod: a sandbox task plus workload tasks, with the seed's rules (seed: shimPod).

Every rule returns the seed's errdefs kind.  The isolation backend is chosen once, from the
sandbox spec, and shared by every task of the pod.

When the sandbox's init exits (killed from outside, or stopped by CRI), what happens to the
workloads depends on who owns them (``Backend.sandbox_owns_workloads``).  In a VM pod the VM is
the sandbox, and the pod SIGKILLs its workloads, as the seed's hypervisor-isolated pods do when
their utility VM goes.  In a process pod they keep running, as with runc-v2: a container with its
own pid namespace stays RUNNING to CRI (which marks the pod NOTREADY and stops it), and the
kernel itself ends those that shared the sandbox's pid namespace.  A host pod's sandbox has no
process; the seed's job-container pods leave the workloads alone when it ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from podshim import errdefs, oci
from podshim.backends.base import Backend, ContainerRequest
from podshim.events import Publisher
from podshim.oci import ContainerType
from podshim.process import LIVE, ExecState, ExitInfo
from podshim.task import Task

log = logging.getLogger(__name__)

TaskFactory = Callable[[Backend, ContainerRequest, Publisher], Awaitable[Task]]


def _expect_pod_annotations(spec: dict[str, Any], kind: ContainerType, pod_id: str) -> None:
    """CRI's container-type and sandbox-id, as the seed checks them: FailedPrecondition if off."""
    got_kind, sid = oci.sandbox_type_and_id(spec)
    if got_kind is not kind:
        raise errdefs.FailedPrecondition(
            f"expected annotation: '{oci.CONTAINER_TYPE}': '{kind.value}' got '{got_kind.value}'"
        )
    if sid != pod_id:
        raise errdefs.FailedPrecondition(f"expected annotation '{oci.SANDBOX_ID}': '{pod_id}' got '{sid}'")


class Pod:
    def __init__(self, pod_id: str, sandbox: Task, backend: Backend, events: Publisher,
                 task_factory: TaskFactory, spec: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.id = pod_id
        self.spec = spec or {}
        self.sandbox = sandbox
        self.backend = backend
        self.events = events
        self._task_factory = task_factory
        self.workloads: dict[str, Task] = {}
        self._creating: set[str] = set()
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    async def create(
        cls,
        req: ContainerRequest,
        backend_for: Callable[[ContainerRequest], Backend],
        events: Publisher,
        task_factory: TaskFactory = Task.create,
    ) -> Pod:
        """The seed's createPod: validate the sandbox, pick the backend, create the sandbox task."""
        _expect_pod_annotations(req.spec, ContainerType.SANDBOX, req.id)
        backend = backend_for(req)
        try:
            sandbox = await task_factory(backend, req, events)
        except BaseException:
            # The seed's deferred parent.Close(): nothing made for the pod outlives a failed create.
            await backend.close()
            raise
        return cls(req.id, sandbox, backend, events, task_factory, req.spec)

    @property
    def host_process(self) -> bool:
        return self.backend.name == "host"

    def watch_sandbox(self) -> None:
        """Once the sandbox runs, its exit tears the workloads down where it owns them."""
        if self._watcher is None and self.backend.sandbox_owns_workloads:
            self._watcher = asyncio.get_running_loop().create_task(self._on_sandbox_exit())

    async def _on_sandbox_exit(self) -> None:
        await self.sandbox.init.wait()
        if self.sandbox.init.state is ExecState.CREATED:
            return  # a failed start, not an exit
        live = [t for t in self.workloads.values() if t.init.state is ExecState.RUNNING]
        if live:
            log.info("sandbox %s exited: killing %d workload(s)", self.id, len(live))
            await asyncio.gather(*(t.kill("", 9, True) for t in live), return_exceptions=True)

    # -- the seed's shimPod interface -----------------------------------------------------------

    async def create_task(self, req: ContainerRequest) -> Task:
        if req.id == self.id:
            raise errdefs.AlreadyExists(f"task with id: '{req.id}' already exists")
        if self.sandbox.init.state is not ExecState.RUNNING:
            raise errdefs.FailedPrecondition(
                f"task with id: '{req.id}' cannot be created in pod: '{self.id}' which is not running"
            )
        if req.id in self.workloads or req.id in self._creating:
            raise errdefs.AlreadyExists(f"task with id: '{req.id}' already exists in pod: '{self.id}'")
        if self.host_process:
            # Every container of a host-process pod runs on the host, or none does.
            if oci.host_process_choice(req.spec) is False:
                raise errdefs.FailedPrecondition(
                    f"cannot create a normal container '{req.id}' in host-process pod '{self.id}'"
                )
            oci.pass_through(self.spec, req.spec, oci.HOSTPROCESS_PASS_THROUGH)
        elif oci.host_process_choice(req.spec):
            raise errdefs.FailedPrecondition(
                f"cannot create host-process container '{req.id}' in pod '{self.id}', "
                "which is not host-process"
            )
        _expect_pod_annotations(req.spec, ContainerType.CONTAINER, self.id)
        self._creating.add(req.id)
        try:
            task = await self._task_factory(self.backend, req, self.events)
        finally:
            self._creating.discard(req.id)
        self.workloads[req.id] = task
        return task

    def get_task(self, tid: str) -> Task:
        if tid == self.id:
            return self.sandbox
        task = self.workloads.get(tid)
        if task is None:
            raise errdefs.NotFound(f"task with id: '{tid}' not found")
        return task

    def list_tasks(self) -> list[Task]:
        return [self.sandbox, *self.workloads.values()]

    async def kill_task(self, tid: str, eid: str, signal: int, all: bool) -> None:
        task = self.get_task(tid)
        if all and eid:
            raise errdefs.FailedPrecondition(f"cannot signal all with non empty ExecID: '{eid}'")
        if all and tid == self.id and task.init.state is ExecState.RUNNING:
            # Kill-all on the sandbox: every workload concurrently, the sandbox last.  Only while
            # the sandbox runs: once it has exited, its workloads are on their own (see above),
            # and CRI's handling of that exit (a kill-all on the dead sandbox before deleting it)
            # must not end them.
            results = await asyncio.gather(
                *(w.kill(eid, signal, all) for w in list(self.workloads.values())), return_exceptions=True
            )
            await task.kill(eid, signal, all)
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, errdefs.NotFound):
                    raise r
            return
        await task.kill(eid, signal, all)

    async def delete_task(self, tid: str) -> ExitInfo:
        """Delete a task's container; a workload's id is then free for reuse.  The sandbox task
        stays tracked, and queryable, until the shim exits."""
        task = self.get_task(tid)
        if task.init.state in LIVE:
            raise errdefs.FailedPrecondition("cannot delete task with running exec")
        info = await task.delete("")
        if tid != self.id:
            self.workloads.pop(tid, None)
        return info

    @property
    def alive(self) -> bool:
        return bool(self.workloads) or self.sandbox.init.state is not ExecState.DELETED

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        await self.backend.close()
