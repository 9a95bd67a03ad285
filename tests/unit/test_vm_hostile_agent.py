"""The host's end of the agent channel against a hostile guest: a fake agent that speaks our
protocol over a unix socket to the real AgentClient and VMBackend, then misbehaves.

What must hold: the shim's memory stays bounded whatever the guest sends; events for ids the
backend did not register change nothing (and are not kept); a guest that breaks the protocol
loses its channel and the pod is a dead VM: each of its processes exits with status 1.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from podshim.backends.base import ContainerRequest
from podshim.backends.vm import spec as vmspec
from podshim.backends.vm.backend import FORCED_EXIT_STATUS, VMBackend, VMContainer, VMProcess
from podshim.guest import agent as guest
from podshim.guest import protocol as P
from podshim.system.stdio import StdioConfig
from podshim.vm import client as vmclient
from podshim.vm.client import AgentClient
from podshim.vm.console import ConsoleLog

Attack = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
DEADLINE = 20.0


class Pod:
    """A VMBackend on a fake agent's channel, with processes registered as after Create."""

    def __init__(self, backend: VMBackend, client: AgentClient) -> None:
        self.backend = backend
        self.client = client
        self.ooms: list[str] = []
        self.exits: dict[tuple[str, str], int] = {}

    def process(self, cid: str, exec_id: str = "", pid: int = 100) -> VMProcess:
        b = self.backend
        c = b.containers.get(cid)
        if c is None:
            req = ContainerRequest(cid, "/nonexistent", {}, [], StdioConfig(), "test")
            c = b.containers[cid] = VMContainer(b, req)
        p = c.init if not exec_id else VMProcess(c, exec_id, StdioConfig())
        p.pid = pid
        b.register(p)
        p.on_exit(lambda status, _at: self.exits.__setitem__(p.key, status))
        return p

    async def wait_closed(self) -> None:
        async with asyncio.timeout(DEADLINE):
            while not self.client.closed:
                await asyncio.sleep(0.01)


async def _handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    dec = P.Decoder()
    while True:
        data = await reader.read(65536)
        assert data, "the host closed before HELLO"
        for f in dec.feed(data):
            if f.type == P.HELLO:
                session = P.decode_json(f.payload)["session"]
                writer.write(P.encode_json(P.HELLO, 0, {"session": session, "processes": []}))
                await writer.drain()
                return


@pytest.fixture
async def hostile(tmp_path: Path) -> AsyncIterator[Callable[[Attack], Awaitable[Pod]]]:
    servers: list[asyncio.Server] = []
    pods: list[Pod] = []
    attacks: list[asyncio.Task[None]] = []

    async def start(attack: Attack) -> Pod:
        path = str(tmp_path / f"agent{len(servers)}.sock")
        go = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _handshake(reader, writer)
            await go.wait()
            try:
                await attack(reader, writer)
            except (ConnectionError, OSError):
                pass  # the host cut us off: what a hostile guest should expect
            finally:
                writer.close()

        async def serve_task(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            attacks.append(asyncio.current_task())  # type: ignore[arg-type]
            await serve(reader, writer)

        servers.append(await asyncio.start_unix_server(serve_task, path))
        pod_box: list[Pod] = []
        backend = VMBackend(
            vmspec.VMParams(256, 1, "vmlinux", "initrd"),
            f"pod{len(servers)}",
            lambda cid: pod_box[0].ooms.append(cid),
        )
        client = AgentClient(path, backend._event)
        assert await client.connect(10) == []
        backend.attach(client)
        pod = Pod(backend, client)
        pod_box.append(pod)
        pods.append(pod)
        # The test registers its processes first; then the guest may start.
        asyncio.get_running_loop().call_soon(go.set)
        return pod

    yield start
    for pod in pods:
        await pod.backend.close()
    for t in attacks:
        t.cancel()
    await asyncio.gather(*attacks, return_exceptions=True)
    for s in servers:
        s.close()


def _assert_dead_vm(pod: Pod, *procs: VMProcess) -> None:
    assert pod.client.closed
    assert pod.client.close_reason.startswith("protocol violation"), pod.client.close_reason
    for p in procs:
        assert pod.exits.get(p.key) == FORCED_EXIT_STATUS, (p.key, pod.exits)


async def test_a_data_flood_past_the_window_is_a_dead_vm_and_memory_stays_bounded(hostile: Any) -> None:
    """The guest ignores the window on a stream whose client reads nothing: without the host's
    check every byte would queue in the shim."""
    flood = 64 << 20
    chunk = b"x" * P.DATA_CHUNK
    sid_box: list[int] = []

    async def attack(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for _ in range(flood // len(chunk)):
            w.write(P.encode(P.DATA, sid_box[0], chunk))
            await w.drain()

    tracemalloc.start()
    try:
        pod = await hostile(attack)
        init = pod.process("c1")
        other = pod.process("c1", "e1", pid=101)
        r, w = os.pipe()  # nobody reads r: the sink's writes block once the pipe is full
        try:
            sid = pod.client.new_stream()
            sid_box.append(sid)
            pod.client.attach_output(sid, w)
            await pod.wait_closed()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            os.close(r)
    finally:
        tracemalloc.stop()
    assert "window" in pod.client.close_reason
    _assert_dead_vm(pod, init, other)
    assert peak < 16 << 20, f"the shim held {peak >> 20} MiB of a {flood >> 20} MiB flood"
    print(f"\npeak of traced allocations during a {flood >> 20} MiB DATA flood: {peak / 2**20:.1f} MiB")


async def test_data_on_a_stream_the_shim_never_opened_is_a_dead_vm(hostile: Any) -> None:
    async def attack(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(P.encode(P.DATA, 4242, b"who asked?"))
        await w.drain()

    pod = await hostile(attack)
    p = pod.process("c1")
    await pod.wait_closed()
    assert "never opened" in pod.client.close_reason
    _assert_dead_vm(pod, p)


async def test_a_guest_that_floods_without_reading_is_cut_off(
    hostile: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output of a deleted process is acknowledged without a client to write to; a guest that
    floods such a stream and never reads the ACKs would pile them up in the shim."""
    monkeypatch.setattr(vmclient, "MAX_UNSENT", 256 << 10)
    sid_box: list[int] = []

    async def attack(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        frame = P.encode(P.DATA, sid_box[0], b"y")
        for _ in range(400_000):  # 6 MB of frames, 7 MB of ACKs the guest never reads
            w.write(frame)
            await w.drain()

    pod = await hostile(attack)
    p = pod.process("c1")
    sid_box.append(pod.client.new_stream())  # opened, and its process already gone
    await pod.wait_closed()
    assert "does not read" in pod.client.close_reason
    _assert_dead_vm(pod, p)


async def test_events_for_foreign_ids_change_nothing_and_are_not_kept(hostile: Any) -> None:
    """Exits and OOMs for ids this pod never registered (another pod's container, made-up ids) are
    dropped: not reported, not stored for later, not a reason to kill the pod."""

    async def attack(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for i in range(20_000):
            w.write(
                P.encode_json(P.EVENT, 0, {"event": "exit", "id": f"made-up-{i}", "exec_id": "", "status": 0})
            )
            w.write(P.encode_json(P.EVENT, 0, {"event": "oom", "id": f"made-up-{i}"}))
            if i % 500 == 0:
                await w.drain()
        for cid in ("other-pod-ctr", "victim"):
            w.write(P.encode_json(P.EVENT, 0, {"event": "oom", "id": cid}))
            w.write(P.encode_json(P.EVENT, 0, {"event": "exit", "id": cid, "exec_id": "", "status": 137}))
        # Then an honest exit of our own, which must still get through.
        w.write(P.encode_json(P.EVENT, 0, {"event": "exit", "id": "c1", "exec_id": "", "status": 3}))
        await w.drain()
        await asyncio.sleep(3600)

    victim_pod = await hostile(attack_nothing)
    victim = victim_pod.process("victim")
    pod = await hostile(attack)
    mine = pod.process("c1")
    async with asyncio.timeout(DEADLINE):
        while mine.status is None:
            await asyncio.sleep(0.01)
    assert mine.status == 3
    assert not pod.client.closed
    assert pod.ooms == [] and victim_pod.ooms == []
    assert pod.backend._early_exits == {}
    assert victim.status is None and not victim_pod.client.closed


async def attack_nothing(_r: asyncio.StreamReader, _w: asyncio.StreamWriter) -> None:
    await asyncio.sleep(3600)


def _frames(*frames: bytes) -> Attack:
    async def attack(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for f in frames:
            w.write(f)
        await w.drain()
        await asyncio.sleep(3600)

    return attack


def _header_for_unknown_type() -> bytes:
    prefix = P.HEADER.pack(P.MAGIC, 0, 0, 99, 0, 0)[:-2]
    return prefix + P._check(prefix).to_bytes(2, "big")


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"\x00garbage that is no frame at all" * 4, id="bytes-between-frames"),
        pytest.param(_header_for_unknown_type(), id="unknown-frame-type"),
        pytest.param(P.encode(P.EVENT, 0, b"{not json"), id="event-not-json"),
        pytest.param(
            P.encode_json(P.EVENT, 0, {"event": "exit", "id": "c1", "status": "x"}), id="exit-bad-status"
        ),
        pytest.param(P.encode_json(P.EVENT, 0, {"event": "exit", "status": 0}), id="exit-without-id"),
        pytest.param(P.encode_json(P.EVENT, 0, {"event": "reboot", "id": "c1"}), id="unknown-event"),
        pytest.param(P.encode(P.ACK, 1, b"\x00\x01\x02"), id="ack-not-u32"),
        pytest.param(P.encode(P.RESPONSE, 1, b"[]"), id="response-not-object"),
        pytest.param(P.encode_json(P.REQUEST, 1, {"op": "create"}), id="request-from-guest"),
        pytest.param(P.encode_json(P.HELLO, 0, {"session": 1}), id="hello-after-handshake"),
    ],
)
async def test_garbage_after_the_handshake_is_a_clean_vm_death(hostile: Any, wire: bytes) -> None:
    pod = await hostile(_frames(wire))
    init = pod.process("c1")
    ex = pod.process("c1", "e1", pid=101)
    await pod.wait_closed()
    _assert_dead_vm(pod, init, ex)
    # Dead means dead: later calls fail at once instead of waiting for an answer.
    with pytest.raises(vmclient.AgentGone):
        await pod.backend.call("ping")


# -- the agent: signal 0 ---------------------------------------------------------------------


def test_signal_0_stays_signal_0_in_the_guest() -> None:
    """kill -0 probes a process; the agent once read signal 0 as "none given" and sent SIGKILL."""
    ours, theirs = socket.socketpair()
    child = subprocess.Popen(["sleep", "60"])
    try:
        agent = guest.Agent(guest.Channel(theirs.fileno()))
        c = guest.Container(agent, "c1", "/bundle")
        p = guest.Proc(c, "e1", cast(guest.Stdio, None))
        p.pid = child.pid
        c.execs["e1"] = p
        agent.containers["c1"] = c
        assert agent.op_kill({"id": "c1", "exec_id": "e1", "signal": 0}) == {}
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=1)
        agent.op_kill({"id": "c1", "exec_id": "e1", "signal": int(signal.SIGTERM)})
        assert child.wait(timeout=10) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()
        ours.close()
        theirs.close()


# -- the console -------------------------------------------------------------------------------


async def test_a_console_flood_keeps_only_a_bounded_tail(tmp_path: Path) -> None:
    """Guest root may write its serial console without end; the host keeps at most twice the
    limit on disk, and the newest output is always there."""
    r, w = os.pipe()
    path = str(tmp_path / "console.log")
    con = ConsoleLog(r, path, limit=64 << 10)
    line = b"flood " * 1000 + b"\n"

    def write() -> None:
        with os.fdopen(w, "wb") as f:
            for _ in range(2000):  # 12 MB
                f.write(line)
            f.write(b"the last words\n")

    writer = asyncio.get_running_loop().run_in_executor(None, write)
    async with asyncio.timeout(DEADLINE):
        await writer
        await con.task
    sizes = [os.path.getsize(p) for p in (path, path + ".1") if os.path.exists(p)]
    assert sum(sizes) <= 2 * (64 << 10), sizes
    with open(path, "rb") as f:
        assert f.read().endswith(b"the last words\n")
