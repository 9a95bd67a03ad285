"""The shim's end of the agent channel: requests, events and stdio streams over
:mod:`podshim.guest.protocol`, on the qemu chardev's unix socket.

A session starts with HELLO; frames that arrive before the agent's HELLO answer are leftovers of
an earlier connection and are dropped.  The answer's process snapshot lets the backend settle
exits it missed while disconnected.  Stdio DATA is written to a local fd by a task per stream
and acknowledged once written, so one slow reader holds back only its own stream.

The guest may be hostile, so after the handshake the host holds the agent to the protocol
(:class:`ProtocolViolation` closes the channel, and the backend takes the VM for dead):

* a stream may have at most :data:`~podshim.guest.protocol.WINDOW` unacknowledged bytes in
  flight: a sink never queues more, whatever the guest sends;
* DATA only on streams the shim opened; no HELLO or REQUEST from the guest; no bytes between
  frames (a resync); every JSON and ACK payload well formed;
* frames the shim must send without waiting (ACKs, EOFs) may not pile up: a guest that stops
  reading its port while it keeps writing is cut off at :data:`MAX_UNSENT` bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any

from podshim import errdefs
from podshim.guest import protocol as P
from podshim.shim.telemetry import TELEMETRY
from podshim.system import pump
from podshim.system.stdio import drive

log = logging.getLogger(__name__)

CALL_TIMEOUT = 120.0  # runc under TCG on a busy host is slow, but never this slow
# What the host may hold unsent for the guest.  Legitimately bounded by the stdin windows (the
# guest reads its port continuously); a guest that floods while it reads nothing exceeds it.
MAX_UNSENT = 16 << 20

_ERRORS: dict[str, type[errdefs.ShimError]] = {
    "not_found": errdefs.NotFound,
    "invalid_argument": errdefs.InvalidArgument,
    "failed_precondition": errdefs.FailedPrecondition,
    "already_exists": errdefs.AlreadyExists,
}


class AgentGone(errdefs.ShimError):
    """The channel closed: the VM or its agent is gone."""


class ProtocolViolation(AgentGone):
    """The guest broke the protocol: the channel is closed and the VM is taken for dead."""


class AgentError(errdefs.ShimError):
    """The agent answered with an error it does not classify (runc's failures, mostly)."""


class _OutputSink:
    """Guest output for one stream: written to ``fd`` in order, acknowledged once written (or
    dropped, once nobody reads any more: the guest's window must not stall on that)."""

    def __init__(self, client: AgentClient, sid: int, fd: int) -> None:
        self.client, self.sid, self.fd = client, sid, fd
        self.queue: asyncio.Queue[tuple[bytes, bool]] = asyncio.Queue()
        self.unacked = 0  # received and not yet acknowledged: never more than the window
        self.task = asyncio.get_running_loop().create_task(self._run())

    def put(self, data: bytes, eof: bool) -> None:
        self.unacked += len(data)
        if self.unacked > P.WINDOW:
            raise ProtocolViolation(
                f"stream {self.sid}: the guest sent {self.unacked} unacknowledged bytes, "
                f"over the window of {P.WINDOW}"
            )
        self.queue.put_nowait((data, eof))

    async def _run(self) -> None:
        os.set_blocking(self.fd, False)
        sink = pump.Sink(self.fd)
        try:
            while True:
                data, eof = await self.queue.get()
                await drive(sink.write(data))
                if data:
                    self.unacked -= len(data)
                    with contextlib.suppress(AgentGone):  # closed: the rest is still written out
                        self.client.send(P.encode_ack(self.sid, len(data)))
                if eof:
                    return
        finally:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.client._sinks.pop(self.sid, None)


class _InputSource:
    """Local stdin for one stream: read from ``fd``, sent within the window, EOF passed on."""

    def __init__(self, client: AgentClient, sid: int, fd: int) -> None:
        self.client, self.sid, self.fd = client, sid, fd
        self.window = pump.Window(P.WINDOW)
        self.credit = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    def ack(self, n: int) -> None:
        self.window.ack(n)
        self.credit.set()

    async def _wait_credit(self) -> None:
        while not self.window.room:
            self.credit.clear()
            await self.credit.wait()

    def _send(self, data: bytes, eof: bool) -> None:
        self.client.send(P.encode(P.DATA, self.sid, data, P.FLAG_EOF if eof else 0))

    async def _run(self) -> None:
        os.set_blocking(self.fd, False)
        try:
            await drive(pump.send_stream(self.fd, self.window, self._send, P.DATA_CHUNK), self._wait_credit)
        except AgentGone:
            return
        finally:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.client._sources.pop(self.sid, None)


class AgentClient:
    def __init__(self, path: str, on_event: Callable[[dict[str, Any]], None]) -> None:
        self.path = path
        self._on_event = on_event
        self._on_close: list[Callable[[], None]] = []
        self._sock: socket.socket | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._last_stream = 0
        self._sinks: dict[int, _OutputSink] = {}
        self._sources: dict[int, _InputSource] = {}
        self.session = 0
        self.closed = False
        self.close_reason = ""
        self.resyncs = 0

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    def new_stream(self) -> int:
        self._last_stream += 1
        return self._last_stream

    # -- connection -------------------------------------------------------------------------

    async def connect(self, timeout: float) -> list[dict[str, Any]]:
        """Open a session; returns the agent's process snapshot.  Waits for the agent to come up
        (the guest's port is open from qemu's start, the agent answers only once it runs)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path, limit=P.MAX_PAYLOAD * 2)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                # qemu binds the chardev socket a moment before it listens on it.
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.01)
        self._writer = writer
        self.session = secrets.randbits(31) or 1
        dec = P.Decoder()
        writer.write(P.encode_json(P.HELLO, 0, {"session": self.session}))

        async def handshake() -> tuple[dict[str, Any], list[P.Frame]]:
            while True:
                data = await reader.read(65536)
                if not data:
                    raise AgentGone("the agent channel closed during the handshake")
                frames = dec.feed(data)
                for i, frame in enumerate(frames):
                    if frame.type != P.HELLO:
                        continue  # a leftover of an earlier session
                    msg = P.decode_json(frame.payload)
                    if msg.get("session") == self.session:
                        return msg, frames[i + 1 :]

        try:
            answer, early = await asyncio.wait_for(handshake(), max(0.1, deadline - loop.time()))
        except BaseException:
            writer.close()
            raise
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop(reader, dec, early))
        return list(answer.get("processes") or [])

    async def _read_loop(self, reader: asyncio.StreamReader, dec: P.Decoder, early: list[P.Frame]) -> None:
        why = "the agent channel closed"
        synced = dec.resyncs  # skipping an old session's leftovers is fine until the handshake
        try:
            for frame in early:
                self._dispatch(frame)
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                frames = dec.feed(data)
                if dec.resyncs != synced:
                    raise ProtocolViolation("the guest sent bytes that are not a frame")
                for frame in frames:
                    self._dispatch(frame)
        except (ProtocolViolation, P.ProtocolError) as e:
            why = f"protocol violation: {e}"
            log.warning("agent channel %s: %s", self.path, why)
        except (ConnectionError, OSError) as e:
            log.warning("agent channel: %s", e)
        except Exception:
            log.exception("agent channel reader failed")
        finally:
            self.resyncs += dec.resyncs
            self._shutdown(why)

    def _dispatch(self, frame: P.Frame) -> None:
        """Raises ProtocolViolation or ProtocolError for what a well-behaved agent never sends."""
        if frame.type == P.RESPONSE:
            resp = P.decode_json(frame.payload)
            fut = self._pending.pop(frame.stream, None)
            if fut is not None and not fut.done():
                fut.set_result(resp)
        elif frame.type == P.EVENT:
            self._on_event(P.decode_json(frame.payload))
        elif frame.type == P.DATA:
            sink = self._sinks.get(frame.stream)
            if sink is not None:
                sink.put(frame.payload, bool(frame.flags & P.FLAG_EOF))
            elif not 0 < frame.stream <= self._last_stream:
                raise ProtocolViolation(f"DATA on stream {frame.stream}, which the shim never opened")
            elif frame.payload:
                # Output of a stream nobody holds (its process was deleted): keep the guest's
                # window open all the same.
                self.send(P.encode_ack(frame.stream, len(frame.payload)))
        elif frame.type == P.ACK:
            n = P.decode_ack(frame.payload)
            src = self._sources.get(frame.stream)
            if src is not None:
                src.ack(n)
        else:
            raise ProtocolViolation(f"the guest sent a frame of type {frame.type} after the handshake")

    def _shutdown(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = why
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(AgentGone(why))
        self._pending.clear()
        for sink in list(self._sinks.values()):
            sink.queue.put_nowait((b"", True))  # past the window check: the end of a closed stream
        for src in list(self._sources.values()):
            src.task.cancel()
        if self._writer is not None:
            self._writer.close()
        for cb in self._on_close:
            cb()

    async def close(self) -> None:
        self._shutdown("the agent channel was closed by the shim")
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        tasks = [s.task for s in self._sinks.values()] + [s.task for s in self._sources.values()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- sending ------------------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        if self.closed or self._writer is None:
            raise AgentGone("the agent channel is closed")
        if self._writer.transport.get_write_buffer_size() > MAX_UNSENT:
            why = f"the guest does not read its channel ({MAX_UNSENT} bytes unsent)"
            log.warning("agent channel %s: protocol violation: %s", self.path, why)
            self._shutdown(f"protocol violation: {why}")
            raise ProtocolViolation(why)
        self._writer.write(frame)

    async def call(self, op: str, timeout: float = CALL_TIMEOUT, **args: Any) -> dict[str, Any]:
        rid = next(self._ids)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending[rid] = fut
        t0 = loop.time()
        try:
            self.send(P.encode_json(P.REQUEST, rid, {"op": op, **args}))
            assert self._writer is not None
            await self._writer.drain()
            resp = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise AgentGone(f"the agent did not answer {op} within {timeout:.0f} s") from None
        except ConnectionError as e:
            raise AgentGone(f"the agent channel failed: {e}") from e
        finally:
            self._pending.pop(rid, None)
            TELEMETRY.agent_call(op, loop.time() - t0)
        if resp.get("ok"):
            return resp
        kind = str(resp.get("error", "unknown"))
        raise _ERRORS.get(kind, AgentError)(str(resp.get("message") or f"{op} failed in the VM"))

    # -- streams ------------------------------------------------------------------------------

    def attach_output(self, sid: int, fd: int) -> asyncio.Task[None]:
        """Write stream ``sid`` into ``fd`` (ours to close); the task ends at the stream's EOF."""
        sink = _OutputSink(self, sid, fd)
        self._sinks[sid] = sink
        if self.closed:
            sink.queue.put_nowait((b"", True))
        return sink.task

    def attach_input(self, sid: int, fd: int) -> asyncio.Task[None]:
        """Send ``fd``'s bytes (ours to close) as stream ``sid`` until EOF."""
        src = _InputSource(self, sid, fd)
        self._sources[sid] = src
        return src.task
