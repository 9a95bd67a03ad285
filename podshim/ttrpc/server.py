"""asyncio ttrpc server: one protocol object per connection over :mod:`codec`.

Each request runs in its own task and its reply is written whenever it completes, so a
blocking ``Wait`` never holds up ``State`` on the same connection (spec §7.1). Replies are
built as a single buffer and handed to one ``transport.write``; the loop is single
threaded, so frames from concurrent handlers never interleave.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from google.protobuf.message import DecodeError, Message

from podshim.api.ttrpc_pb2 import Request
from podshim.errdefs import Code
from podshim.ttrpc.codec import (
    HEADER_SIZE,
    MAX_MESSAGE,
    MSG_REQUEST,
    Frame,
    FrameDecoder,
    ReceiveBuffer,
    encode_response_frame,
    encode_status_frame,
    oversized_message,
)
from podshim.ttrpc.status import CANCELED_MESSAGE, status_of

Handler = Callable[[Message, "RequestContext"], Awaitable[Message]]
PeerCheck = Callable[[int, int, int], bool]
Observer = Callable[[str, str, int, float], None]
"""Told (service, method, status code, seconds) as each request completes."""
Methods = Mapping[str, "Method"]
LazyMethods = Callable[[], Methods]
"""A service whose modules load at its first request (diagnostics: no shim pays for them up front)."""

_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid


@dataclass(frozen=True, slots=True)
class Method:
    request_type: type[Message]
    handler: Handler


@dataclass(slots=True)
class RequestContext:
    service: str
    method: str
    metadata: list[tuple[str, str]]
    deadline: float | None  # loop.time() based; None = no deadline

    def get(self, key: str) -> str | None:
        """First metadata value for ``key`` (keys may repeat on the wire)."""
        for k, v in self.metadata:
            if k == key:
                return v
        return None


def same_user(pid: int, uid: int, gid: int) -> bool:
    """Default peer check: only our own effective uid may talk to the shim."""
    return uid == os.geteuid()


class Server:
    def __init__(
        self,
        services: Mapping[str, Methods | LazyMethods],
        *,
        peer_check: PeerCheck | None = same_user,
        cancel_on_disconnect: bool = False,
        observer: Observer | None = None,
    ) -> None:
        # cancel_on_disconnect is off by default: cancelling e.g. a Create half way
        # through because containerd restarted is worse than letting it finish.
        self._services: dict[str, dict[str, Method]] = {}
        self._lazy: dict[str, LazyMethods] = {}
        for name, methods in services.items():
            if callable(methods):
                self._lazy[name] = methods
            else:
                self._services[name] = dict(methods)
        self._peer_check = peer_check
        self._observer = observer
        self._peer_check = peer_check
        self._cancel_on_disconnect = cancel_on_disconnect
        self._conns: set[_Connection] = set()
        self._listener: asyncio.AbstractServer | None = None
        self._closing = False
        self._stopped = asyncio.Event()

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    async def serve(self, listening_sock: socket.socket) -> None:
        """Serve connections from ``listening_sock`` until :meth:`close`.

        The socket (bound, listening, possibly inherited) then belongs to the server and
        is closed by :meth:`close`.
        """
        if self._closing:
            return
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_unix_server(lambda: _Connection(self, loop), sock=listening_sock)
        try:
            await self._stopped.wait()
        finally:
            if not self._stopped.is_set():  # serve() itself was cancelled: no grace
                self._closing = True
                self._listener.close()
                for conn in list(self._conns):
                    for task in conn.tasks:
                        task.cancel()
                    conn.abort()
                self._stopped.set()

    async def close(self, grace: float = 1.0) -> None:
        """Stop accepting, give in-flight requests ``grace`` seconds, then drop everything."""
        if self._closing:
            await self._stopped.wait()
            return
        self._closing = True
        if self._listener is not None:
            self._listener.close()
        conns = list(self._conns)
        for conn in conns:
            conn.stop_reading()
        tasks = [t for conn in conns for t in conn.tasks]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=grace)
        for conn in list(self._conns):
            conn.close()  # close() flushes replies already written
        self._stopped.set()

    # -- used by _Connection --------------------------------------------------------------

    def _admit(self, conn: _Connection, sock: socket.socket | None) -> bool:
        if self._closing:
            return False
        if self._peer_check is not None:
            if sock is None:
                return False
            try:
                pid, uid, gid = _UCRED.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
                )
            except OSError:
                return False
            if not self._peer_check(pid, uid, gid):
                return False
        self._conns.add(conn)
        return True

    def _dispatch(self, conn: _Connection, stream_id: int, payload: bytes) -> None:
        # Order of checks and messages follows ttrpc v1.1.1's server.
        try:
            req = Request.FromString(payload)
        except DecodeError as exc:
            conn.send_status(stream_id, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
            return
        if not stream_id & 1:
            conn.send_status(
                stream_id, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
            )
            return
        methods = self._services.get(req.service)
        if methods is None and req.service in self._lazy:
            try:
                methods = self._services[req.service] = dict(self._lazy[req.service]())
            except Exception as exc:  # a service that cannot load must not take the connection down
                conn.send_status(stream_id, Code.INTERNAL, f"service {req.service} failed to load: {exc}")
                return
            del self._lazy[req.service]
        if methods is None:
            conn.send_status(stream_id, Code.UNIMPLEMENTED, f"service {req.service}")
            return
        method = methods.get(req.method)
        if method is None:
            conn.send_status(stream_id, Code.UNIMPLEMENTED, f"method {req.method}")
            return
        try:
            msg = method.request_type.FromString(req.payload)
        except DecodeError as exc:
            conn.send_status(stream_id, Code.INTERNAL, f"ttrpc: error unmarshalling payload: {exc}")
            return
        loop = conn.loop
        # Like Go's context.WithTimeout: any non-zero value is a deadline, negative = expired.
        deadline = loop.time() + req.timeout_nano / 1e9 if req.timeout_nano else None
        ctx = RequestContext(req.service, req.method, [(kv.key, kv.value) for kv in req.metadata], deadline)
        task = loop.create_task(_run(conn, stream_id, method.handler, msg, ctx, self._observer))
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)

    def _lost(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        if self._cancel_on_disconnect:
            for task in conn.tasks:
                task.cancel()


async def _run(
    conn: _Connection,
    stream_id: int,
    handler: Handler,
    msg: Message,
    ctx: RequestContext,
    observer: Observer | None,
) -> None:
    code: int = Code.OK
    t0 = conn.loop.time() if observer is not None else 0.0
    try:
        if ctx.deadline is None:
            resp = await handler(msg, ctx)
        else:
            async with asyncio.timeout_at(ctx.deadline):
                resp = await handler(msg, ctx)
        frame = encode_response_frame(stream_id, resp.SerializeToString())
        if len(frame) - HEADER_SIZE > MAX_MESSAGE:
            # The peer would drop it anyway; tell it why instead of sending 4 MiB+.
            frame = encode_status_frame(
                stream_id, Code.RESOURCE_EXHAUSTED, oversized_message(len(frame) - HEADER_SIZE)
            )
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # we cancelled it (close or disconnect): nobody is waiting for a reply
        code = Code.CANCELLED
        frame = encode_status_frame(stream_id, code, CANCELED_MESSAGE)
    except Exception as exc:
        code, message = status_of(exc)
        frame = encode_status_frame(stream_id, code, message)
    conn.write(frame)
    if observer is not None:
        observer(ctx.service, ctx.method, code, conn.loop.time() - t0)


class _Connection(asyncio.BufferedProtocol):
    # A BufferedProtocol lets the transport recv_into one reused buffer instead of
    # allocating a 256 KiB bytes object per read, a measurable share of a round trip.
    __slots__ = ("_decoder", "_reading", "_recv_buf", "_server", "_transport", "loop", "tasks")

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self.loop = loop
        self._decoder = FrameDecoder()
        self._recv_buf = ReceiveBuffer()
        self._transport: asyncio.Transport | None = None
        self._reading = True
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if not self._server._admit(self, transport.get_extra_info("socket")):
            # Like Go's handshaker failing: drop the connection, say nothing.
            self._transport = None
            transport.abort()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._recv_buf.get()

    def buffer_updated(self, nbytes: int) -> None:
        if self._transport is None:
            return
        server = self._server
        # feed() copies what it keeps, so the receive buffer is free again on return.
        for event in self._decoder.feed(self._recv_buf.received(nbytes)):
            if isinstance(event, Frame):
                # Other frame types are ignored for forward compatibility, as v1.1.1 does.
                if event.msg_type == MSG_REQUEST:
                    server._dispatch(self, event.stream_id, event.payload)
            else:
                # Go answers an oversized frame of any type, on its stream id.
                self.send_status(event.stream_id, Code.RESOURCE_EXHAUSTED, oversized_message(event.length))

    def eof_received(self) -> bool | None:
        return None  # close our side too; pending replies have nowhere to go

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._transport = None
            self._server._lost(self)

    # Backpressure: if the peer stops reading replies, stop reading its requests.
    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and self._reading:
            self._transport.resume_reading()

    def write(self, frame: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(frame)

    def send_status(self, stream_id: int, code: Code, message: str) -> None:
        self.write(encode_status_frame(stream_id, code, message))

    def stop_reading(self) -> None:
        self._reading = False
        if self._transport is not None and self._transport.is_reading():
            self._transport.pause_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
