"""Server and client over a real unix socket, plus raw frames for what a client can't send."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from podshim import errdefs
from podshim.api import task_pb2, task_types_pb2
from podshim.errdefs import Code
from podshim.ttrpc.client import Client
from podshim.ttrpc.codec import (
    HEADER,
    HEADER_SIZE,
    MAX_MESSAGE,
    MSG_REQUEST,
    decode_response,
    encode_frame,
    encode_request,
)
from podshim.ttrpc.server import Method, RequestContext, Server
from podshim.ttrpc.status import RemoteNotFound, TtrpcClosed, TtrpcError

# A broken server tends to hang rather than fail: bound every wait on its behaviour so a
# regression is a clean failure (pytest-timeout's alarm would tear the loop down instead).
WAIT = 5.0

R = TypeVar("R", bound=Message)
SVC = "podshim.test.Svc"
StateReq = task_pb2.StateRequest
StateResp = task_pb2.StateResponse


class BoundedClient(Client):
    """A client whose calls fail instead of hanging when the server misbehaves."""

    async def call(self, service: str, method: str, request: Message, response_type: type[R], **kw: Any) -> R:
        return await asyncio.wait_for(super().call(service, method, request, response_type, **kw), WAIT)


@dataclass
class FakeService:
    """Handlers keyed off the request; events let tests observe them without sleeping."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    wait_entered: asyncio.Event = field(default_factory=asyncio.Event)
    handler_cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    handler_finished: asyncio.Event = field(default_factory=asyncio.Event)
    contexts: list[RequestContext] = field(default_factory=list)

    async def state(self, req: Message, ctx: RequestContext) -> Message:
        assert isinstance(req, StateReq)
        self.contexts.append(ctx)
        for _ in range(len(req.id) % 5):  # reorder completions a little
            await asyncio.sleep(0)
        return StateResp(id=req.id, exec_id=req.exec_id, pid=len(req.id))

    async def wait(self, req: Message, ctx: RequestContext) -> Message:
        assert isinstance(req, StateReq)
        self.wait_entered.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.handler_cancelled.set()
            raise
        self.handler_finished.set()
        return StateResp(id=req.id, status=task_types_pb2.STOPPED)

    async def fail(self, req: Message, ctx: RequestContext) -> Message:
        assert isinstance(req, StateReq)
        kinds: dict[str, BaseException] = {
            "notfound": errdefs.NotFound("process already finished"),
            "exists": errdefs.AlreadyExists("id x"),
            "precondition": errdefs.FailedPrecondition("process not created"),
            "invalid": errdefs.InvalidArgument("bad"),
            "unimplemented": errdefs.NotImplementedErr("nope"),
            "unknown": errdefs.ShimError("cannot delete a running process"),
            "plain": RuntimeError("boom"),
            "timeout": TimeoutError(),
        }
        raise kinds[req.id]

    async def empty(self, req: Message, ctx: RequestContext) -> Message:
        return Empty()

    async def metadata(self, req: Message, ctx: RequestContext) -> Message:
        return StateResp(stdin=";".join(f"{k}={v}" for k, v in ctx.metadata))

    def services(self) -> dict[str, dict[str, Method]]:
        handlers: dict[str, Callable[[Message, RequestContext], Awaitable[Message]]] = {
            "State": self.state,
            "Wait": self.wait,
            "Fail": self.fail,
            "Empty": self.empty,
            "Meta": self.metadata,
        }
        return {SVC: {name: Method(StateReq, h) for name, h in handlers.items()}}


@dataclass
class Env:
    server: Server
    service: FakeService
    path: Path
    serve_task: asyncio.Task[None]


def _listen(path: Path) -> socket.socket:
    assert len(os.fsencode(path)) < 108, "unix socket path too long"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.fspath(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    sock.setblocking(False)
    return sock


async def _start(tmp_path: Path, **kwargs: object) -> Env:
    service = FakeService()
    server = Server(service.services(), **kwargs)  # type: ignore[arg-type]
    path = tmp_path / "s.sock"
    task = asyncio.create_task(server.serve(_listen(path)))
    return Env(server, service, path, task)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = await _start(tmp_path)
    yield e
    await e.server.close(grace=0.1)
    await e.serve_task


@pytest.fixture
async def client(env: Env) -> AsyncIterator[Client]:
    c = await BoundedClient.connect(env.path)
    yield c
    await c.close()


class Raw:
    """A bare socket for frames the client refuses to send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: Path) -> Raw:
        return cls(*await asyncio.open_unix_connection(os.fspath(path)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, stream_id: int, method: str, req: Message, **kw: object) -> None:
        payload = encode_request(SVC, method, req.SerializeToString(), **kw)  # type: ignore[arg-type]
        await self.send(encode_frame(stream_id, MSG_REQUEST, payload))

    async def recv(self) -> tuple[int, int, bytes]:
        async with asyncio.timeout(WAIT):
            length, stream_id, msg_type, _ = HEADER.unpack(await self.reader.readexactly(HEADER_SIZE))
            return stream_id, msg_type, await self.reader.readexactly(length)

    async def recv_status(self) -> tuple[int, int, str]:
        stream_id, _, payload = await self.recv()
        resp = decode_response(payload)
        return stream_id, resp.status.code, resp.status.message

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest.fixture
async def raw(env: Env) -> AsyncIterator[Raw]:
    r = await Raw.open(env.path)
    yield r
    await r.close()


# -- basic calls -------------------------------------------------------------------------


async def test_socket_is_0600_and_call_works(env: Env, client: Client) -> None:
    assert stat.S_IMODE(env.path.stat().st_mode) == 0o600
    resp = await client.call(SVC, "State", StateReq(id="abc", exec_id="e"), StateResp)
    assert (resp.id, resp.exec_id, resp.pid) == ("abc", "e", 3)
    assert env.server.connection_count == 1


async def test_many_concurrent_calls_route_by_stream_id(client: Client) -> None:
    ids = [f"c{i}" * (i % 7 + 1) for i in range(200)]
    resps = await asyncio.gather(*(client.call(SVC, "State", StateReq(id=i), StateResp) for i in ids))
    assert [r.id for r in resps] == ids


async def test_blocking_wait_does_not_block_state(env: Env, client: Client) -> None:
    wait = asyncio.create_task(client.call(SVC, "Wait", StateReq(id="w"), StateResp))
    await asyncio.wait_for(env.service.wait_entered.wait(), WAIT)
    assert (await client.call(SVC, "State", StateReq(id="s"), StateResp)).id == "s"
    assert not wait.done()
    env.service.release.set()
    assert (await asyncio.wait_for(wait, WAIT)).status == 3


async def test_replies_are_written_out_of_order(env: Env, raw: Raw) -> None:
    await raw.request(1, "Wait", StateReq(id="w"))
    await asyncio.wait_for(env.service.wait_entered.wait(), WAIT)
    await raw.request(3, "State", StateReq(id="s"))
    stream_id, _, payload = await raw.recv()
    assert stream_id == 3
    env.service.release.set()
    stream_id, _, payload = await raw.recv()
    assert stream_id == 1


async def test_empty_response_is_zero_length_frame(raw: Raw) -> None:
    await raw.request(1, "Empty", StateReq())
    assert await raw.recv() == (1, 2, b"")


async def test_metadata_and_deadline_reach_handler(env: Env, client: Client) -> None:
    md = [("containerd-namespace-ttrpc", "k8s.io"), ("x", "1"), ("x", "2")]
    resp = await client.call(SVC, "Meta", StateReq(), StateResp, metadata=md)
    assert resp.stdin == "containerd-namespace-ttrpc=k8s.io;x=1;x=2"
    await client.call(SVC, "State", StateReq(id="d"), StateResp, timeout=30)
    ctx = env.service.contexts[-1]
    assert (ctx.service, ctx.method) == (SVC, "State")
    loop = asyncio.get_running_loop()
    assert ctx.deadline is not None and 0 < ctx.deadline - loop.time() <= 30
    await client.call(SVC, "State", StateReq(id="n"), StateResp)
    assert env.service.contexts[-1].deadline is None


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "code", "message", "errdefs_class"),
    [
        ("notfound", Code.NOT_FOUND, "process already finished: not found", errdefs.NotFound),
        ("exists", Code.ALREADY_EXISTS, "id x: already exists", errdefs.AlreadyExists),
        (
            "precondition",
            Code.FAILED_PRECONDITION,
            "process not created: failed precondition",
            errdefs.FailedPrecondition,
        ),
        ("invalid", Code.INVALID_ARGUMENT, "bad: invalid argument", errdefs.InvalidArgument),
        ("unimplemented", Code.UNIMPLEMENTED, "nope: not implemented", errdefs.NotImplementedErr),
        ("unknown", Code.UNKNOWN, "cannot delete a running process", errdefs.ShimError),
        ("plain", Code.UNKNOWN, "boom", errdefs.ShimError),
        ("timeout", Code.DEADLINE_EXCEEDED, "context deadline exceeded", errdefs.DeadlineExceeded),
    ],
)
async def test_error_codes_round_trip(
    client: Client, kind: str, code: Code, message: str, errdefs_class: type[errdefs.ShimError]
) -> None:
    with pytest.raises(TtrpcError) as info:
        await client.call(SVC, "Fail", StateReq(id=kind), StateResp)
    assert (info.value.code, info.value.message) == (code, message)
    assert isinstance(info.value, errdefs_class)
    # A handler error leaves the connection usable.
    assert (await client.call(SVC, "State", StateReq(id="ok"), StateResp)).id == "ok"


async def test_unknown_service_and_method(client: Client) -> None:
    with pytest.raises(errdefs.NotImplementedErr, match="^service nope.Svc$"):
        await client.call("nope.Svc", "State", StateReq(), StateResp)
    with pytest.raises(errdefs.NotImplementedErr, match="^method Nope$"):
        await client.call(SVC, "Nope", StateReq(), StateResp)


async def test_empty_request_is_unimplemented_empty_service(raw: Raw) -> None:
    await raw.send(encode_frame(1, MSG_REQUEST, b""))
    assert await raw.recv_status() == (1, Code.UNIMPLEMENTED, "service ")


async def test_even_stream_id_is_rejected(raw: Raw) -> None:
    await raw.request(2, "State", StateReq(id="x"))
    assert await raw.recv_status() == (
        2,
        Code.INVALID_ARGUMENT,
        "StreamID must be odd for client initiated streams",
    )


async def test_undecodable_payload_is_internal(raw: Raw) -> None:
    await raw.send(encode_frame(1, MSG_REQUEST, encode_request(SVC, "State", b"\x0a\x05ab")))
    stream_id, code, message = await raw.recv_status()
    assert (stream_id, code) == (1, Code.INTERNAL)
    assert message.startswith("ttrpc: error unmarshalling payload: ")


async def test_garbage_then_normal_call_on_same_connection(raw: Raw) -> None:
    await raw.send(encode_frame(7, MSG_REQUEST, b"\xff\xff\xff\xff"))
    stream_id, code, message = await raw.recv_status()
    assert (stream_id, code) == (7, Code.INVALID_ARGUMENT)
    assert message.startswith("unmarshal request error: ")
    await raw.request(9, "State", StateReq(id="after"))
    stream_id, _, payload = await raw.recv()
    assert stream_id == 9
    assert StateResp.FromString(decode_response(payload).payload).id == "after"


async def test_unknown_frame_types_are_ignored(raw: Raw) -> None:
    await raw.send(encode_frame(1, 0x03, b"data", flags=0x02) + encode_frame(3, MSG_REQUEST + 1, b"x"))
    await raw.request(5, "State", StateReq(id="z"))
    stream_id, _, _ = await raw.recv()
    assert stream_id == 5  # nothing was sent for streams 1 and 3


async def test_oversized_frame_then_normal_call(raw: Raw) -> None:
    length = MAX_MESSAGE + 1
    await raw.send(HEADER.pack(length, 5, MSG_REQUEST, 0))
    chunk = b"\0" * 65536
    for off in range(0, length, len(chunk)):
        await raw.send(chunk[: min(len(chunk), length - off)])
    assert await raw.recv_status() == (
        5,
        Code.RESOURCE_EXHAUSTED,
        "message length 4194305 exceed maximum message size of 4194304",
    )
    await raw.request(7, "State", StateReq(id="still"))
    stream_id, _, payload = await raw.recv()
    assert (stream_id, StateResp.FromString(decode_response(payload).payload).id) == (7, "still")


async def test_client_refuses_oversized_request(client: Client) -> None:
    with pytest.raises(errdefs.ResourceExhausted):
        await client.call(SVC, "State", StateReq(id="x" * MAX_MESSAGE), StateResp)
    assert (await client.call(SVC, "State", StateReq(id="y"), StateResp)).id == "y"


# -- deadlines ---------------------------------------------------------------------------


async def test_timeout_nano_cancels_handler(env: Env, raw: Raw) -> None:
    await raw.request(1, "Wait", StateReq(id="w"), timeout_nano=20_000_000)
    assert await raw.recv_status() == (1, Code.DEADLINE_EXCEEDED, "context deadline exceeded")
    assert env.service.handler_cancelled.is_set()
    assert not env.service.handler_finished.is_set()


async def test_negative_timeout_nano_is_already_expired(env: Env, raw: Raw) -> None:
    await raw.request(1, "Wait", StateReq(id="w"), timeout_nano=-1)
    assert (await raw.recv_status())[1] == Code.DEADLINE_EXCEEDED


async def test_client_timeout(env: Env, client: Client) -> None:
    with pytest.raises(errdefs.DeadlineExceeded):
        await client.call(SVC, "Wait", StateReq(id="w"), StateResp, timeout=0.02)
    await asyncio.wait_for(env.service.handler_cancelled.wait(), WAIT)  # the server enforced it too
    assert (await client.call(SVC, "State", StateReq(id="ok"), StateResp)).id == "ok"


# -- connections -------------------------------------------------------------------------


async def test_peer_check_rejects(tmp_path: Path) -> None:
    seen: list[tuple[int, int, int]] = []

    def deny(pid: int, uid: int, gid: int) -> bool:
        seen.append((pid, uid, gid))
        return False

    e = await _start(tmp_path, peer_check=deny)
    try:
        c = await BoundedClient.connect(e.path)
        with pytest.raises(TtrpcClosed):
            await c.call(SVC, "State", StateReq(), StateResp)
        await asyncio.wait_for(c.wait_closed(), WAIT)
        assert c.closed
        assert seen == [(os.getpid(), os.geteuid(), os.getegid())]
        assert e.server.connection_count == 0
    finally:
        await e.server.close()
        await e.serve_task


async def test_default_peer_check_admits_same_user(env: Env, client: Client) -> None:
    assert (await client.call(SVC, "State", StateReq(id="me"), StateResp)).id == "me"


async def test_disconnect_does_not_cancel_handler_by_default(env: Env) -> None:
    c = await BoundedClient.connect(env.path)
    wait = asyncio.create_task(c.call(SVC, "Wait", StateReq(id="w"), StateResp))
    await asyncio.wait_for(env.service.wait_entered.wait(), WAIT)
    await c.close()
    with pytest.raises(TtrpcClosed):
        await asyncio.wait_for(wait, WAIT)
    env.service.release.set()
    await asyncio.wait_for(env.service.handler_finished.wait(), WAIT)
    assert not env.service.handler_cancelled.is_set()


async def test_disconnect_cancels_handler_when_asked(tmp_path: Path) -> None:
    e = await _start(tmp_path, cancel_on_disconnect=True)
    try:
        c = await BoundedClient.connect(e.path)
        wait = asyncio.create_task(c.call(SVC, "Wait", StateReq(id="w"), StateResp))
        await asyncio.wait_for(e.service.wait_entered.wait(), WAIT)
        await c.close()
        with pytest.raises(TtrpcClosed):
            await asyncio.wait_for(wait, WAIT)
        await asyncio.wait_for(e.service.handler_cancelled.wait(), WAIT)
    finally:
        await e.server.close()
        await e.serve_task


async def test_close_lets_inflight_reply_finish(env: Env, client: Client) -> None:
    wait = asyncio.create_task(client.call(SVC, "Wait", StateReq(id="w"), StateResp))
    await asyncio.wait_for(env.service.wait_entered.wait(), WAIT)
    closing = asyncio.create_task(env.server.close(grace=30))
    await asyncio.sleep(0)  # let close() stop the listener before the handler is released
    env.service.release.set()
    assert (await asyncio.wait_for(wait, WAIT)).id == "w"
    await asyncio.wait_for(closing, WAIT)
    await env.serve_task
    await client.wait_closed()
    with pytest.raises(TtrpcClosed):
        await client.call(SVC, "State", StateReq(), StateResp)


async def test_close_cancels_after_grace_and_fails_pending(env: Env, client: Client) -> None:
    wait = asyncio.create_task(client.call(SVC, "Wait", StateReq(id="w"), StateResp))
    await asyncio.wait_for(env.service.wait_entered.wait(), WAIT)
    await env.server.close(grace=0.01)
    assert env.service.handler_cancelled.is_set()
    with pytest.raises(TtrpcClosed) as info:
        await asyncio.wait_for(wait, WAIT)
    assert (info.value.code, info.value.message) == (Code.UNAVAILABLE, "ttrpc: closed")
    assert isinstance(info.value, errdefs.Unavailable)
    with pytest.raises(OSError):
        await BoundedClient.connect(env.path)  # no longer accepting


async def test_remote_error_is_errdefs_kind(client: Client) -> None:
    with pytest.raises(errdefs.NotFound) as info:
        await client.call(SVC, "Fail", StateReq(id="notfound"), StateResp)
    assert type(info.value) is RemoteNotFound


async def test_client_backpressure_respects_timeout(tmp_path: Path) -> None:
    """A peer that never reads: the call waits for the write buffer to drain, bounded by timeout."""
    accepted = asyncio.Event()

    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()

    path = tmp_path / "stuck.sock"
    stuck = await asyncio.start_unix_server(never_read, os.fspath(path), limit=1)
    try:
        c = await BoundedClient.connect(path)
        await asyncio.wait_for(accepted.wait(), WAIT)
        big = StateReq(id="x" * (3 * 1024 * 1024))
        with pytest.raises(errdefs.DeadlineExceeded):
            await c.call(SVC, "State", big, StateResp, timeout=0.05)  # more than the socket holds
        assert c._protocol.paused
        c._transport.abort()
        await asyncio.wait_for(c.wait_closed(), WAIT)
    finally:
        stuck.close()


_OTHER_UID_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(bytes.fromhex(sys.argv[2]))
try:
    print("closed" if s.recv(65536) == b"" else "answered")
except ConnectionResetError:  # closed with our request unread
    print("closed")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
async def test_a_client_with_another_uid_is_refused_by_the_default_check(tmp_path: Path) -> None:
    """The real peer check (SO_PEERCRED, same euid), from a process that really is another
    user: the socket is opened to everyone here so that only the check stands in the way."""
    d = Path(tempfile.mkdtemp(prefix="podshim-peer-", dir="/tmp"))
    try:
        d.chmod(0o755)
        e = await _start(d)
        e.path.chmod(0o666)
        request = encode_request(SVC, "State", StateReq(id="x").SerializeToString())
        frame = encode_frame(1, MSG_REQUEST, request)
        proc = await asyncio.create_subprocess_exec(
            "/usr/bin/python3", "-S", "-c", _OTHER_UID_CLIENT, str(e.path), frame.hex(),
            user=65534, group=65534, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        try:
            assert proc.returncode == 0, err.decode()
            assert out.decode().strip() == "closed"
            assert e.server.connection_count == 0
            assert e.service.contexts == [], "the handler ran for another user"
            # Our own uid is still served.
            c = await BoundedClient.connect(e.path)
            assert (await c.call(SVC, "State", StateReq(id="ok"), StateResp)).id == "ok"
            await c.close()
        finally:
            await e.server.close(grace=0.1)
            await e.serve_task
    finally:
        shutil.rmtree(d, ignore_errors=True)
