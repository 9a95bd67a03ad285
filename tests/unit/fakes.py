"""Fakes of the backend interface for unit tests of the task and exec layers (pure logic).

A FakeProcess starts, exits and dies only when the test says so, so each interleaving the
real reaper can produce is one line of a test, with no sleeps.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from google.protobuf.message import Message

from podshim.backends.base import Container, ContainerRequest, ExitCallback, Process, ProcessGone
from podshim.system.stdio import StdioConfig
from podshim.task import Task

BOUND = 5.0
"""Every wait on the code under test is bounded: a regression fails, it does not hang."""


class FakeProcess(Process):
    def __init__(self, pid: int = 0) -> None:
        self.pid = pid
        self._callback: ExitCallback | None = None
        self._exit: tuple[int, float] | None = None
        self.start_gate: asyncio.Future[int] | None = None  # set: start() waits for it
        self.start_error: BaseException | None = None
        self.start_pid = 0
        self.signals: list[int] = []
        self.exit_on_kill: int | None = None  # kill(sig) makes it exit with this status
        self.closed = 0
        self.starting = asyncio.Event()

    # The reaper's side ---------------------------------------------------------------------------
    def exit(self, status: int) -> None:
        assert self._exit is None, "a process exits once"
        self._exit = (status, time.time())
        if self._callback is not None:
            self._callback(*self._exit)

    # Process ---------------------------------------------------------------------------------------
    def on_exit(self, callback: ExitCallback) -> None:
        self._callback = callback
        if self._exit is not None:
            callback(*self._exit)

    async def start(self) -> int:
        self.starting.set()
        if self.start_gate is not None:
            await self.start_gate
        if self.start_error is not None:
            raise self.start_error
        if self.start_pid:
            self.pid = self.start_pid
        return self.pid

    async def kill(self, signal: int) -> None:
        if self._exit is not None or not self.pid:
            raise ProcessGone()
        self.signals.append(signal)
        if self.exit_on_kill is not None:
            self.exit(self.exit_on_kill)

    def resize(self, width: int, height: int) -> None:
        pass

    def close_stdin(self) -> None:
        pass

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        self.closed += 1


class FakeContainer(Container):
    def __init__(self, cid: str = "c1", pid: int = 100, shares_pid_namespace: bool = False) -> None:
        self.id = cid
        self.fake_init = FakeProcess(pid)
        self.init = self.fake_init
        self._shares = shares_pid_namespace
        self.execs: dict[str, FakeProcess] = {}
        self.next_exec_pid = 200
        self.kill_all_signals: list[int] = []
        self.deleted = 0
        self.delete_gate: asyncio.Future[None] | None = None
        self.kill_init_on_delete = True  # runc delete of a created container kills its init

    @property
    def shares_pid_namespace(self) -> bool:
        return self._shares

    async def new_exec(self, exec_id: str, process_spec: dict[str, Any], stdio: StdioConfig) -> Process:
        p = FakeProcess()
        p.start_pid = self.next_exec_pid
        self.next_exec_pid += 1
        self.execs[exec_id] = p
        return p

    async def kill_all(self, signal: int) -> None:
        self.kill_all_signals.append(signal)

    async def pause(self) -> None:
        pass

    async def resume(self) -> None:
        pass

    async def update(self, resources_json: bytes) -> None:
        pass

    async def pids(self) -> list[int]:
        return []

    async def stats(self) -> tuple[str, bytes]:
        return "", b""

    async def delete(self) -> None:
        if self.delete_gate is not None:
            await self.delete_gate
        self.deleted += 1
        if self.kill_init_on_delete and self.fake_init._exit is None:
            self.fake_init.exit(137)


class Events:
    """The shim's publisher, recording (topic, message)."""

    def __init__(self) -> None:
        self.published: list[tuple[str, Message]] = []

    def publish(self, topic: str, event: Message) -> None:
        self.published.append((topic, event))

    @property
    def topics(self) -> list[str]:
        return [t for t, _ in self.published]

    def named(self) -> list[str]:
        """Topics with the process they are about, e.g. "/tasks/exit e1"."""
        out = []
        for topic, msg in self.published:
            who = getattr(msg, "exec_id", "") or getattr(msg, "id", "") or getattr(msg, "container_id", "")
            out.append(f"{topic} {who}")
        return out


def request(cid: str = "c1") -> ContainerRequest:
    return ContainerRequest(id=cid, bundle=f"/b/{cid}", spec={}, rootfs=[], stdio=StdioConfig(),
                            namespace="ns")  # fmt: skip


def make_task(**container_kw: Any) -> tuple[Task, FakeContainer, Events]:
    c = FakeContainer(**container_kw)
    events = Events()
    return Task(request(c.id), c, events), c, events


async def until(cond: Any, what: str = "condition") -> None:
    """Wait (bounded) for cond() to hold, yielding to the loop in between."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0)
