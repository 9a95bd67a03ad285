"""The host-process pod's sandbox: a task with no process, driven through the real exec state
machine (the seed's wcowPodSandboxExec table, with the shim's pid as the sandbox pid)."""

from __future__ import annotations

import asyncio
import os

import pytest

from podshim import errdefs
from podshim.backends.base import ContainerRequest
from podshim.backends.host.sandbox import SandboxHolder
from podshim.process import Exec, ExecState
from podshim.system.stdio import StdioConfig
from podshim.task import Task


class Events:
    def __init__(self) -> None:
        self.topics: list[str] = []

    def publish(self, topic: str, event: object) -> None:
        self.topics.append(topic)


def sandbox() -> tuple[SandboxHolder, Exec, Events]:
    req = ContainerRequest(id="pod", bundle="/b", spec={}, rootfs=[], stdio=StdioConfig(), namespace="k8s.io")
    holder = SandboxHolder(req)
    events = Events()
    e = Task(req, holder, events).init
    return holder, e, events


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_start_runs_with_the_shims_pid() -> None:
    _, e, events = sandbox()
    assert e.pid == 0
    assert await e.start() == os.getpid()
    assert e.state is ExecState.RUNNING
    assert events.topics == ["/tasks/start"]


async def test_kill_when_running_exits_zero() -> None:
    _, e, events = sandbox()
    await e.start()
    await e.kill(9)
    info = await asyncio.wait_for(e.wait(), 1)
    assert (info.status, e.state) == (0, ExecState.EXITED)
    assert events.topics == ["/tasks/start", "/tasks/exit"]


async def test_kill_when_created_exits_one() -> None:
    _, e, _ = sandbox()
    await e.kill(0)  # even signal 0 ends it, as in the seed
    info = await asyncio.wait_for(e.wait(), 1)
    assert info.status == 1


async def test_kill_after_exit_is_not_found() -> None:
    _, e, _ = sandbox()
    await e.start()
    await e.kill(15)
    await settle()
    with pytest.raises(errdefs.NotFound):
        await e.kill(15)


async def test_start_twice_is_an_error() -> None:
    _, e, _ = sandbox()
    await e.start()
    with pytest.raises(errdefs.ShimError):
        await e.start()


async def test_wait_blocks_until_killed() -> None:
    _, e, _ = sandbox()
    await e.start()
    waiter = asyncio.ensure_future(e.wait())
    await settle()
    assert not waiter.done()
    await e.kill(9)
    assert (await asyncio.wait_for(waiter, 1)).status == 0


async def test_no_exec_into_the_sandbox() -> None:
    holder, _, _ = sandbox()
    with pytest.raises(errdefs.NotImplementedErr):
        await holder.new_exec("e1", {"args": ["true"]}, StdioConfig())


async def test_resize_is_failed_precondition_and_stats_not_found() -> None:
    holder, e, _ = sandbox()
    with pytest.raises(errdefs.FailedPrecondition):
        e.resize(80, 24)
    with pytest.raises(errdefs.NotFound):
        await holder.stats()
