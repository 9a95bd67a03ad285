"""The event publisher against a real ttrpc server standing in for containerd's Events service:
order, retries, reconnection, giving up, and the bounded flush at shutdown."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from podshim import errdefs
from podshim.api import events_pb2, events_ttrpc_pb2
from podshim.shim import publisher as pub
from podshim.shim.publisher import EventPublisher
from podshim.ttrpc.server import Method, RequestContext, Server

BOUND = 5.0


@dataclass
class Containerd:
    """Forward handler: records events, fails the first ``failures`` calls."""

    failures: int = 0
    drop_connection_once: bool = False
    got: list[str] = field(default_factory=list)
    namespaces: list[str | None] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def forward(self, req: Message, ctx: RequestContext) -> Message:
        assert isinstance(req, events_ttrpc_pb2.ForwardRequest)
        if self.failures > 0:
            self.failures -= 1
            raise errdefs.ShimError("containerd is busy")
        ev = events_pb2.TaskExit.FromString(req.envelope.event.value)
        self.got.append(f"{req.envelope.topic} {ev.id}")
        self.namespaces.append(ctx.get("containerd-namespace-ttrpc"))
        self.changed.set()
        return Empty()

    async def until(self, n: int) -> None:
        async with asyncio.timeout(BOUND):
            while len(self.got) < n:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pub, "RETRY_DELAY", 0.001)


def serve(path: str) -> tuple[Containerd, Callable[[], Awaitable[None]]]:
    """A stand-in containerd listening on path; returns it and its stop."""
    cd = Containerd()
    server = Server({pub.SERVICE: {"Forward": Method(events_ttrpc_pb2.ForwardRequest, cd.forward)}})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(4)
    sock.setblocking(False)
    serving = asyncio.ensure_future(server.serve(sock))

    async def stop() -> None:
        await server.close(grace=0.1)
        await serving

    return cd, stop


@pytest.fixture
async def containerd(tmp_path: Path) -> AsyncIterator[tuple[Containerd, str]]:
    path = str(tmp_path / "ttrpc.sock")
    cd, stop = serve(path)
    yield cd, path
    await stop()


def exit_event(i: int) -> events_pb2.TaskExit:
    return events_pb2.TaskExit(container_id="c", id=f"e{i}")


async def test_events_arrive_in_publish_order(containerd: tuple[Containerd, str]) -> None:
    cd, path = containerd
    p = EventPublisher(path, "ns1")
    for i in range(100):
        p.publish("/tasks/exit", exit_event(i))
    await cd.until(100)
    assert cd.got == [f"/tasks/exit e{i}" for i in range(100)]
    assert set(cd.namespaces) == {"ns1"}
    await p.close()


async def test_a_failed_forward_is_retried_and_not_overtaken(containerd: tuple[Containerd, str]) -> None:
    cd, path = containerd
    cd.failures = 3
    p = EventPublisher(path, "ns1")
    for i in range(3):
        p.publish("/tasks/exit", exit_event(i))
    await cd.until(3)
    assert cd.got == ["/tasks/exit e0", "/tasks/exit e1", "/tasks/exit e2"]
    await p.close()


async def test_an_event_is_dropped_after_its_retries_and_the_next_goes_out(
    containerd: tuple[Containerd, str],
) -> None:
    cd, path = containerd
    cd.failures = pub.RETRIES + 1
    p = EventPublisher(path, "ns1")
    p.publish("/tasks/exit", exit_event(0))
    p.publish("/tasks/exit", exit_event(1))
    await cd.until(1)
    assert cd.got == ["/tasks/exit e1"]
    await p.close()


async def test_it_reconnects_when_containerd_restarts(tmp_path: Path) -> None:
    path = str(tmp_path / "ttrpc.sock")
    p = EventPublisher(path, "ns1")
    p.publish("/tasks/exit", exit_event(0))  # nobody listening yet: retried until someone does
    cd, stop = serve(path)
    await cd.until(1)
    await stop()  # "containerd restarts": the connection goes
    os.unlink(path)
    cd2, stop2 = serve(path)
    p.publish("/tasks/exit", exit_event(1))
    await cd2.until(1)
    assert cd2.got == ["/tasks/exit e1"]
    await p.close()
    await stop2()


async def test_close_flushes_what_is_queued_within_its_bound(containerd: tuple[Containerd, str]) -> None:
    cd, path = containerd
    p = EventPublisher(path, "ns1")
    for i in range(20):
        p.publish("/tasks/exit", exit_event(i))
    await asyncio.wait_for(p.close(timeout=BOUND), BOUND * 2)
    assert len(cd.got) == 20


async def test_close_gives_up_on_an_unreachable_containerd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pub, "RETRY_DELAY", 10.0)
    p = EventPublisher(str(tmp_path / "nobody.sock"), "ns1")
    p.publish("/tasks/exit", exit_event(0))
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.wait_for(p.close(timeout=0.2), BOUND)
    assert loop.time() - start < BOUND
