"""The seed's pod rules, one test each, against fake tasks (pure logic, no containers)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from podshim import errdefs
from podshim.backends.base import Backend, Container, ContainerRequest
from podshim.oci import (
    CONTAINER_TYPE,
    HOST_PROCESS,
    HOSTPROCESS_INHERIT_USER,
    HOSTPROCESS_ROOTFS_LOCATION,
    ISOLATION,
    SANDBOX_ID,
)
from podshim.pod import Pod
from podshim.process import ExecState, ExitInfo
from podshim.system.stdio import StdioConfig

POD = "pod1"


@dataclass
class FakeInit:
    state: ExecState = ExecState.CREATED
    pid: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self) -> ExitInfo:
        await self.done.wait()
        return ExitInfo(self.pid, 0, 1.0)


class FakeTask:
    def __init__(self, tid: str, log: list[tuple[str, str]], kill_delay: float = 0.0) -> None:
        self.id = tid
        self.init = FakeInit()
        self.log = log
        self.kill_delay = kill_delay
        self.kills: list[tuple[str, int, bool]] = []

    async def kill(self, eid: str, signal: int, all: bool) -> None:
        self.log.append(("kill-begin", self.id))
        await asyncio.sleep(self.kill_delay)
        self.kills.append((eid, signal, all))
        self.log.append(("kill-end", self.id))

    async def delete(self, eid: str) -> ExitInfo:
        self.init.state = ExecState.DELETED
        return ExitInfo(self.init.pid, 0, 1.0)


class FakeBackend(Backend):
    name = "fake"

    def __init__(self) -> None:
        self.closed = False

    async def create_container(self, req: ContainerRequest) -> Container:
        raise AssertionError("the fake task factory makes no containers")

    async def close(self) -> None:
        self.closed = True


def request(tid: str, ctype: str | None, sid: str | None) -> ContainerRequest:
    ann: dict[str, Any] = {}
    if ctype is not None:
        ann[CONTAINER_TYPE] = ctype
    if sid is not None:
        ann[SANDBOX_ID] = sid
    return ContainerRequest(
        id=tid,
        bundle=f"/b/{tid}",
        spec={"annotations": ann},
        rootfs=[],
        stdio=StdioConfig(),
        namespace="k8s.io",
    )


class World:
    def __init__(self, kill_delay: float = 0.0, fail_sandbox: bool = False) -> None:
        self.log: list[tuple[str, str]] = []
        self.tasks: dict[str, FakeTask] = {}
        self.backend = FakeBackend()
        self.kill_delay = kill_delay
        self.fail_sandbox = fail_sandbox

    async def factory(self, backend: Backend, req: ContainerRequest, events: Any) -> Any:
        if self.fail_sandbox and req.id == POD:
            raise errdefs.ShimError("runc create failed")
        t = FakeTask(req.id, self.log, self.kill_delay)
        self.tasks[req.id] = t
        return t

    async def pod(self, running: bool = True) -> Pod:
        pod = await Pod.create(request(POD, "sandbox", POD), lambda r: self.backend, events=None,  # type: ignore[arg-type]
                               task_factory=self.factory)  # fmt: skip
        if running:
            self.tasks[POD].init.state = ExecState.RUNNING
        return pod

    async def workload(self, pod: Pod, tid: str, running: bool = True) -> FakeTask:
        await pod.create_task(request(tid, "container", POD))
        t = self.tasks[tid]
        if running:
            t.init.state = ExecState.RUNNING
        return t


# -- createPod ---------------------------------------------------------------------------------


async def test_create_pod_requires_sandbox_type() -> None:
    w = World()
    with pytest.raises(errdefs.FailedPrecondition):
        await Pod.create(request(POD, "container", POD), lambda r: w.backend, None, w.factory)  # type: ignore[arg-type]


async def test_create_pod_requires_own_sandbox_id() -> None:
    w = World()
    with pytest.raises(errdefs.FailedPrecondition):
        await Pod.create(request(POD, "sandbox", "other"), lambda r: w.backend, None, w.factory)  # type: ignore[arg-type]


async def test_create_pod_rejects_half_annotations() -> None:
    w = World()
    with pytest.raises(errdefs.InvalidArgument):
        await Pod.create(request(POD, "sandbox", None), lambda r: w.backend, None, w.factory)  # type: ignore[arg-type]


async def test_failed_create_pod_closes_backend() -> None:
    w = World(fail_sandbox=True)
    with pytest.raises(errdefs.ShimError):
        await w.pod()
    assert w.backend.closed


# -- CreateTask ----------------------------------------------------------------------------------


async def test_create_task_with_pod_id_is_already_exists() -> None:
    w = World()
    pod = await w.pod()
    with pytest.raises(errdefs.AlreadyExists):
        await pod.create_task(request(POD, "container", POD))


async def test_create_task_in_pod_not_running_is_failed_precondition() -> None:
    w = World()
    pod = await w.pod(running=False)
    with pytest.raises(errdefs.FailedPrecondition):
        await pod.create_task(request("c1", "container", POD))


async def test_duplicate_task_is_already_exists() -> None:
    w = World()
    pod = await w.pod()
    await w.workload(pod, "c1")
    with pytest.raises(errdefs.AlreadyExists):
        await pod.create_task(request("c1", "container", POD))


async def test_workload_with_sandbox_type_is_failed_precondition() -> None:
    w = World()
    pod = await w.pod()
    with pytest.raises(errdefs.FailedPrecondition):
        await pod.create_task(request("c1", "sandbox", POD))


async def test_workload_of_other_pod_is_failed_precondition() -> None:
    w = World()
    pod = await w.pod()
    with pytest.raises(errdefs.FailedPrecondition):
        await pod.create_task(request("c1", "container", "other-pod"))


# -- GetTask / ListTasks ---------------------------------------------------------------------------


async def test_get_unknown_task_is_not_found() -> None:
    w = World()
    pod = await w.pod()
    with pytest.raises(errdefs.NotFound):
        pod.get_task("nope")


async def test_list_tasks_has_sandbox_first() -> None:
    w = World()
    pod = await w.pod()
    await w.workload(pod, "c2")
    await w.workload(pod, "c1")
    assert [t.id for t in pod.list_tasks()] == [POD, "c2", "c1"]


# -- KillTask --------------------------------------------------------------------------------------


async def test_kill_all_with_exec_id_is_failed_precondition() -> None:
    w = World()
    pod = await w.pod()
    with pytest.raises(errdefs.FailedPrecondition):
        await pod.kill_task(POD, "e1", 9, True)


async def test_kill_unknown_task_is_not_found() -> None:
    w = World()
    pod = await w.pod()
    with pytest.raises(errdefs.NotFound):
        await pod.kill_task("nope", "", 9, False)


async def test_kill_all_on_sandbox_signals_workloads_concurrently_then_sandbox() -> None:
    w = World(kill_delay=0.05)
    pod = await w.pod()
    for tid in ("c1", "c2", "c3"):
        await w.workload(pod, tid)
    await pod.kill_task(POD, "", 9, True)
    begins = [tid for ev, tid in w.log if ev == "kill-begin"]
    # Every workload's kill began before any finished: they ran concurrently.
    first_end = next(i for i, (ev, _) in enumerate(w.log) if ev == "kill-end")
    assert {tid for ev, tid in w.log[:first_end] if ev == "kill-begin"} == {"c1", "c2", "c3"}
    # The sandbox is signalled last, after every workload's kill completed.
    assert begins[-1] == POD
    assert w.log.index(("kill-begin", POD)) > max(w.log.index(("kill-end", t)) for t in ("c1", "c2", "c3"))
    for tid in ("c1", "c2", "c3", POD):
        assert w.tasks[tid].kills == [("", 9, True)]


async def test_kill_all_on_an_exited_sandbox_signals_only_the_sandbox() -> None:
    """CRI's handling of a sandbox exit ends with a kill-all on it: the workloads stay."""
    w = World()
    pod = await w.pod()
    c1 = await w.workload(pod, "c1")
    w.tasks[POD].init.state = ExecState.EXITED
    await pod.kill_task(POD, "", 9, True)
    assert c1.kills == []
    assert w.tasks[POD].kills == [("", 9, True)]


async def test_kill_all_on_workload_signals_only_that_workload() -> None:
    w = World()
    pod = await w.pod()
    c1 = await w.workload(pod, "c1")
    c2 = await w.workload(pod, "c2")
    await pod.kill_task("c1", "", 15, True)
    assert c1.kills == [("", 15, True)]
    assert c2.kills == []
    assert w.tasks[POD].kills == []


# -- DeleteTask ------------------------------------------------------------------------------------


async def test_delete_running_task_is_failed_precondition() -> None:
    w = World()
    pod = await w.pod()
    await w.workload(pod, "c1")
    with pytest.raises(errdefs.FailedPrecondition):
        await pod.delete_task("c1")


async def test_delete_sandbox_keeps_it_queryable() -> None:
    w = World()
    pod = await w.pod()
    w.tasks[POD].init.state = ExecState.EXITED
    await pod.delete_task(POD)
    assert pod.get_task(POD) is w.tasks[POD]
    assert not pod.alive


async def test_delete_workload_frees_its_id_for_reuse() -> None:
    w = World()
    pod = await w.pod()
    c1 = await w.workload(pod, "c1")
    c1.init.state = ExecState.EXITED
    await pod.delete_task("c1")
    with pytest.raises(errdefs.NotFound):
        pod.get_task("c1")
    again = await w.workload(pod, "c1")
    assert pod.get_task("c1") is again  # type: ignore[comparison-overlap]


async def test_pod_alive_while_workloads_remain() -> None:
    w = World()
    pod = await w.pod()
    c1 = await w.workload(pod, "c1", running=False)
    w.tasks[POD].init.state = ExecState.EXITED
    await pod.delete_task(POD)
    assert pod.alive
    c1.init.state = ExecState.EXITED
    await pod.delete_task("c1")
    assert not pod.alive


# -- sandbox exit ------------------------------------------------------------------------------------


async def _sandbox_exits(owned: bool) -> tuple[FakeTask, FakeTask]:
    w = World()
    w.backend.sandbox_owns_workloads = owned
    pod = await w.pod()
    c1 = await w.workload(pod, "c1")
    c2 = await w.workload(pod, "c2", running=False)
    pod.watch_sandbox()
    sandbox = w.tasks[POD]
    sandbox.init.state = ExecState.EXITED
    sandbox.init.done.set()
    for _ in range(10):
        await asyncio.sleep(0)
    return c1, c2


async def test_sandbox_exit_kills_running_workloads_where_it_owns_them() -> None:
    c1, c2 = await _sandbox_exits(owned=True)  # a VM pod
    assert c1.kills == [("", 9, True)]
    assert c2.kills == []


async def test_sandbox_exit_leaves_workloads_it_does_not_own() -> None:
    c1, c2 = await _sandbox_exits(owned=False)  # process (runc-v2) and host (the seed) pods
    assert c1.kills == [] and c2.kills == []


def test_only_the_vm_sandbox_owns_its_workloads() -> None:
    from podshim.backends.host.backend import HostBackend
    from podshim.backends.runc.backend import RuncBackend
    from podshim.backends.vm.backend import VMBackend

    owners = {b.name: b.sandbox_owns_workloads for b in (HostBackend, RuncBackend, VMBackend)}
    assert owners == {"host": False, "process": False, "vm": True}


# -- host-process pods ---------------------------------------------------------------------------------


class HostWorld(World):
    def __init__(self) -> None:
        super().__init__()
        self.backend.name = "host"

    async def host_pod(self, **sandbox_annotations: str) -> Pod:
        req = request(POD, "sandbox", POD)
        req.spec["annotations"].update(sandbox_annotations)
        pod = await Pod.create(req, lambda r: self.backend, None, self.factory)  # type: ignore[arg-type]
        self.tasks[POD].init.state = ExecState.RUNNING
        return pod


async def test_host_pod_rejects_a_container_that_opts_out() -> None:
    w = HostWorld()
    pod = await w.host_pod()
    req = request("c1", "container", POD)
    req.spec["annotations"][HOST_PROCESS] = "false"
    with pytest.raises(errdefs.FailedPrecondition, match="normal container"):
        await pod.create_task(req)
    assert "c1" not in w.tasks


async def test_every_container_of_a_host_pod_is_host_process() -> None:
    """The pod's handler made it a host pod: its containers need no annotation of their own."""
    w = HostWorld()
    pod = await w.host_pod()
    await pod.create_task(request("c1", "container", POD))
    assert "c1" in pod.workloads


async def test_host_pod_accepts_host_process_containers_and_passes_annotations_through() -> None:
    w = HostWorld()
    pod = await w.host_pod(**{HOSTPROCESS_ROOTFS_LOCATION: "/hpc", HOSTPROCESS_INHERIT_USER: "true"})
    req = request("c1", "container", POD)
    req.spec["annotations"][ISOLATION] = "host"
    req.spec["annotations"][HOSTPROCESS_INHERIT_USER] = "false"  # the container's own value wins
    await pod.create_task(req)
    assert req.spec["annotations"][HOSTPROCESS_ROOTFS_LOCATION] == "/hpc"
    assert req.spec["annotations"][HOSTPROCESS_INHERIT_USER] == "false"


@pytest.mark.parametrize("annotation", [(HOST_PROCESS, "true"), (ISOLATION, "host")])
async def test_normal_pod_rejects_a_host_process_container(annotation: tuple[str, str]) -> None:
    w = World()
    pod = await w.pod()
    req = request("c1", "container", POD)
    req.spec["annotations"][annotation[0]] = annotation[1]
    with pytest.raises(errdefs.FailedPrecondition, match="not host-process"):
        await pod.create_task(req)
    assert "c1" not in w.tasks
