"""asyncio ttrpc client: many concurrent calls multiplexed on one unix connection.

The protocol object is the reader: ``data_received`` routes each reply to the future of
its stream id, so no extra task sits between the socket and the callers. Decoding the
reply happens in the caller's task.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Self, TypeVar

from google.protobuf.message import DecodeError, Message

from podshim.errdefs import Code
from podshim.ttrpc.codec import (
    MAX_MESSAGE,
    MSG_REQUEST,
    MSG_RESPONSE,
    Frame,
    FrameDecoder,
    PayloadError,
    ReceiveBuffer,
    decode_response,
    encode_frame,
    encode_request,
    oversized_message,
)
from podshim.ttrpc.status import DEADLINE_MESSAGE, TtrpcClosed, TtrpcError

R = TypeVar("R", bound=Message)

_MAX_STREAM_ID = 0xFFFFFFFF


class Client:
    def __init__(self, transport: asyncio.Transport, protocol: _ClientProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._next_id = 1

    @classmethod
    async def connect(cls, path: str | os.PathLike[str]) -> Self:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_unix_connection(
            lambda: _ClientProtocol(loop), os.fspath(path)
        )
        return cls(transport, protocol)

    @property
    def closed(self) -> bool:
        return self._protocol.lost

    async def wait_closed(self) -> None:
        await self._protocol.lost_waiter

    async def close(self) -> None:
        self._transport.close()
        await self._protocol.lost_waiter

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[R],
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> R:
        """One unary call. Raises :class:`TtrpcError` (an errdefs kind) for a non-OK status,
        :class:`TtrpcClosed` if the connection is or gets lost."""
        protocol = self._protocol
        if protocol.lost:
            raise TtrpcClosed()
        timeout_nano = 0
        if timeout is not None:
            if timeout <= 0:
                raise TtrpcError(Code.DEADLINE_EXCEEDED, DEADLINE_MESSAGE)
            timeout_nano = int(timeout * 1e9)
        data = encode_request(service, method, request.SerializeToString(), timeout_nano, metadata)
        if len(data) > MAX_MESSAGE:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, oversized_message(len(data)))

        stream_id = self._next_id
        self._next_id = stream_id + 2 if stream_id < _MAX_STREAM_ID - 1 else 1
        waiter: asyncio.Future[bytes] = protocol.loop.create_future()
        protocol.pending[stream_id] = waiter
        try:
            protocol.write(encode_frame(stream_id, MSG_REQUEST, data))
            if timeout is None:
                if protocol.paused:
                    await protocol.drain()
                payload = await waiter
            else:
                async with asyncio.timeout(timeout):
                    if protocol.paused:
                        await protocol.drain()
                    payload = await waiter
        except TimeoutError:
            raise TtrpcError(Code.DEADLINE_EXCEEDED, DEADLINE_MESSAGE) from None
        finally:
            protocol.pending.pop(stream_id, None)

        try:
            resp = decode_response(payload)
        except PayloadError as exc:
            raise TtrpcError(Code.INTERNAL, f"ttrpc: failed to unmarshal response: {exc}") from None
        if resp.HasField("status") and resp.status.code != Code.OK:
            raise TtrpcError(resp.status.code, resp.status.message)
        try:
            return response_type.FromString(resp.payload)
        except DecodeError as exc:
            raise TtrpcError(Code.INTERNAL, f"ttrpc: error unmarshalling payload: {exc}") from None


class _ClientProtocol(asyncio.BufferedProtocol):
    # Buffered for the same reason as the server's connections: recv_into a reused buffer.
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._recv_buf = ReceiveBuffer()
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.lost = False
        self.lost_waiter: asyncio.Future[None] = loop.create_future()
        self.paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._decoder = FrameDecoder()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._recv_buf.get()

    def buffer_updated(self, nbytes: int) -> None:
        pending = self.pending
        for event in self._decoder.feed(self._recv_buf.received(nbytes)):
            waiter = pending.get(event.stream_id)
            if waiter is None or waiter.done():
                continue  # a call that timed out or was cancelled
            if isinstance(event, Frame):
                if event.msg_type == MSG_RESPONSE:
                    waiter.set_result(event.payload)
            elif event.msg_type == MSG_RESPONSE:
                waiter.set_exception(TtrpcError(Code.RESOURCE_EXHAUSTED, oversized_message(event.length)))

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.paused = False
        self._transport = None
        for waiter in self.pending.values():
            if not waiter.done():
                waiter.set_exception(TtrpcClosed())
        self.pending.clear()
        self._wake_drainers()
        if not self.lost_waiter.done():
            self.lost_waiter.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_drainers()

    def write(self, frame: bytes) -> None:
        if self._transport is None:
            raise TtrpcClosed()
        self._transport.write(frame)

    async def drain(self) -> None:
        if self.lost:
            return
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def _wake_drainers(self) -> None:
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
