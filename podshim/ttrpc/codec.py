"""ttrpc v1.1 framing and envelopes, as pure functions over bytes (no I/O, like h11).

A frame is a 10-byte header (payload length u32 BE, stream id u32 BE, type u8, flags u8)
followed by the payload. Requests and responses carry the ``ttrpc.Request`` /
``ttrpc.Response`` protobufs of :mod:`podshim.api.ttrpc_pb2`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

from google.protobuf.message import DecodeError

from podshim.api.google_rpc_status_pb2 import Status
from podshim.api.ttrpc_pb2 import KeyValue, Request, Response

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size
MAX_MESSAGE = 4 * 1024 * 1024
# Sizes of the reusable receive buffer the asyncio protocols read into (ReceiveBuffer).
SMALL_RECV_BUFFER = 4 * 1024
RECV_BUFFER = 64 * 1024

MSG_REQUEST = 1
MSG_RESPONSE = 2

_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from


class Frame(NamedTuple):
    stream_id: int
    msg_type: int
    flags: int
    payload: bytes


class OversizedFrame(NamedTuple):
    """A frame longer than the limit; its payload was skipped, never buffered."""

    stream_id: int
    msg_type: int
    length: int


Event = Frame | OversizedFrame


class PayloadError(ValueError):
    """A payload that does not decode as the expected envelope message."""


def oversized_message(length: int) -> str:
    """ttrpc's ResourceExhausted text, which clients may match on."""
    return f"message length {length} exceed maximum message size of {MAX_MESSAGE}"


def encode_frame(stream_id: int, msg_type: int, payload: bytes, flags: int = 0) -> bytes:
    if len(payload) > 0xFFFFFFFF:
        raise ValueError("payload does not fit a ttrpc frame")
    return _pack_header(len(payload), stream_id, msg_type, flags) + payload


class FrameDecoder:
    """Incremental frame parser: feed it whatever the socket returned, get whole frames.

    ``feed`` never raises: every byte sequence is a valid (possibly incomplete) frame
    stream. An oversized frame is reported once its payload has been skipped, so the
    stream stays in sync and the peer can get its ResourceExhausted reply on that id.
    """

    __slots__ = ("_buf", "_skip", "_skipped", "max_message")

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._skip = 0
        self._skipped: OversizedFrame | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (skipped payload is not held)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse ``data`` (any byte buffer; it is not referenced after the call)."""
        events: list[Event] = []
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            if self._skip:
                return events
            assert self._skipped is not None
            events.append(self._skipped)
            self._skipped = None
            data = memoryview(data)[n:]

        buf = self._buf
        if buf:
            buf += data
            src: bytes | bytearray | memoryview = buf
        else:
            # Common case: the chunk starts on a frame boundary; parse it in place.
            src = data

        size = len(src)
        pos = 0
        limit = self.max_message
        with memoryview(src) as view:
            while size - pos >= HEADER_SIZE:
                length, stream_id, msg_type, flags = _unpack_header(view, pos)
                start = pos + HEADER_SIZE
                end = start + length
                if length > limit:
                    if end <= size:
                        events.append(OversizedFrame(stream_id, msg_type, length))
                        pos = end
                        continue
                    self._skip = end - size
                    self._skipped = OversizedFrame(stream_id, msg_type, length)
                    pos = size
                    break
                if end > size:
                    break
                events.append(Frame(stream_id, msg_type, flags, view[start:end].tobytes()))
                pos = end
            if src is not buf and pos < size:
                buf += view[pos:]
        if src is buf:
            del buf[:pos]
        return events


# -- envelopes ---------------------------------------------------------------------------


def encode_request(
    service: str,
    method: str,
    payload: bytes,
    timeout_nano: int = 0,
    metadata: Sequence[tuple[str, str]] = (),
) -> bytes:
    req = Request(service=service, method=method, payload=payload, timeout_nano=timeout_nano)
    if metadata:
        req.metadata.extend(KeyValue(key=k, value=v) for k, v in metadata)
    return req.SerializeToString()


def decode_request(payload: bytes) -> Request:
    try:
        return Request.FromString(payload)
    except DecodeError as exc:
        raise PayloadError(str(exc)) from None


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_response(payload: bytes) -> bytes:
    """A success ``Response``: no status (as the Go server), ``payload`` in field 2.

    Hand-encoded because it is on every reply's path and is just tag, length, bytes.
    """
    if not payload:
        return b""
    return b"\x12" + _varint(len(payload)) + payload


def encode_response_frame(stream_id: int, payload: bytes) -> bytes:
    """Header and success ``Response`` in one buffer, so a reply is one write."""
    if not payload:
        return _pack_header(0, stream_id, MSG_RESPONSE, 0)
    size = _varint(len(payload))
    return b"".join(
        (_pack_header(1 + len(size) + len(payload), stream_id, MSG_RESPONSE, 0), b"\x12", size, payload)
    )


def status_response(code: int, message: str) -> bytes:
    return Response(status=Status(code=code, message=message)).SerializeToString()


def encode_status_frame(stream_id: int, code: int, message: str) -> bytes:
    return encode_frame(stream_id, MSG_RESPONSE, status_response(code, message))


def decode_response(payload: bytes) -> Response:
    try:
        return Response.FromString(payload)
    except DecodeError as exc:
        raise PayloadError(str(exc)) from None


class ReceiveBuffer:
    """A connection's reusable receive buffer, allocated at its first read and small at first:
    nearly every frame a shim sees is a few hundred bytes, and every pod pays for the buffers of
    its connections. A read that fills it grows it to RECV_BUFFER for the rest of the connection."""

    __slots__ = ("_view",)

    def __init__(self) -> None:
        self._view: memoryview | None = None

    def get(self) -> memoryview:
        if self._view is None:
            self._view = memoryview(bytearray(SMALL_RECV_BUFFER))
        return self._view

    def received(self, nbytes: int) -> memoryview:
        """What the last read put in; valid until the next get()."""
        view = self.get()
        if nbytes == len(view) < RECV_BUFFER:
            self._view = memoryview(bytearray(RECV_BUFFER))
        return view[:nbytes]
