"""The framed protocol between the shim and the guest agent.  Standard library only: this module
runs on the guest's python3 too.

Why not the ttrpc codec: ``podshim.ttrpc.codec`` imports the protobuf runtime, which the guest
does not have (its userland is the host's ``/usr``, not our venv).  The frame layout borrows
ttrpc's idea (a fixed header with length, stream id and type) but adds what a virtio-serial
port needs and a socket does not:

* the channel is one byte pipe that outlives host connections: when the shim reconnects, the
  first bytes it reads may be the tail of a frame written for the previous connection.  So each
  header starts with a magic and ends with a check over the header, and the decoder skips bytes
  until both match (``resyncs`` counts how often it had to).
* payloads are JSON for requests, responses and events (small, debuggable from a console) and
  raw bytes for stdio data, so container output is never re-encoded.

Frame: ``MAGIC(4) length(u32) stream(u32) type(u8) flags(u8) check(u16)`` then ``length`` bytes,
big-endian; ``check`` is the low 16 bits of the CRC-32 of the 14 bytes before it.

Types:

=========  =====================  ==========================================================
type       stream id              payload
=========  =====================  ==========================================================
HELLO      0                      JSON.  Host: ``{"session": n}`` opens a session; the agent
                                  answers HELLO ``{"session": n, "processes": [...]}`` with a
                                  snapshot of every process, so exits that happened while no
                                  host was connected are not lost.  The host ignores every
                                  frame before that answer.
REQUEST    request id             JSON ``{"op": name, ...}``
RESPONSE   request id             JSON ``{"ok": true, ...}`` or ``{"error": kind, "message": s}``
EVENT      0                      JSON ``{"event": "exit" | "oom", ...}``
DATA       stdio stream id        raw bytes; flag EOF (with or without bytes) ends the stream
ACK        stdio stream id        u32: bytes of that stream the receiver has consumed
=========  =====================  ==========================================================

Stdio flows under a per-stream window: a sender keeps at most :data:`WINDOW` unacknowledged
bytes in flight, so a client that stops reading a container's output stops that container
(as a full pipe would), not the whole channel.  A new session resets every window.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any, NamedTuple

MAGIC = b"PSv1"
HEADER = struct.Struct(">4sIIBBH")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 1 << 20
DATA_CHUNK = 32 * 1024
WINDOW = 256 * 1024

HELLO = 1
REQUEST = 2
RESPONSE = 3
EVENT = 4
DATA = 5
ACK = 6
TYPES = frozenset((HELLO, REQUEST, RESPONSE, EVENT, DATA, ACK))

FLAG_EOF = 1

ACK_PAYLOAD = struct.Struct(">I")


class Frame(NamedTuple):
    type: int
    stream: int
    flags: int
    payload: bytes


class ProtocolError(ValueError):
    """A payload that does not decode as the JSON object its frame type promises."""


def _check(prefix: bytes) -> int:
    return zlib.crc32(prefix) & 0xFFFF


def encode(ftype: int, stream: int, payload: bytes = b"", flags: int = 0) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    prefix = HEADER.pack(MAGIC, len(payload), stream, ftype, flags, 0)[:-2]
    return prefix + _check(prefix).to_bytes(2, "big") + payload


def encode_json(ftype: int, stream: int, obj: dict[str, Any]) -> bytes:
    return encode(ftype, stream, json.dumps(obj, separators=(",", ":")).encode())


def encode_ack(stream: int, consumed: int) -> bytes:
    return encode(ACK, stream, ACK_PAYLOAD.pack(consumed))


def decode_json(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except ValueError as e:
        raise ProtocolError(f"payload is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("payload is not a JSON object")
    return obj


def decode_ack(payload: bytes) -> int:
    if len(payload) != ACK_PAYLOAD.size:
        raise ProtocolError("ACK payload is not a u32")
    return int(ACK_PAYLOAD.unpack(payload)[0])


def _valid_header(buf: bytearray | bytes, pos: int) -> bool:
    magic, length, _stream, ftype, _flags, check = HEADER.unpack_from(buf, pos)
    return (
        magic == MAGIC
        and ftype in TYPES
        and length <= MAX_PAYLOAD
        and check == _check(bytes(buf[pos : pos + HEADER_SIZE - 2]))
    )


class Decoder:
    """Incremental, resynchronising frame parser: feed it any bytes, get whole frames."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.resyncs = 0

    def reset(self) -> None:
        """Forget a partial frame (the peer went away mid-frame)."""
        self._buf.clear()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        while len(buf) - pos >= HEADER_SIZE:
            if not _valid_header(buf, pos):
                # Not a frame boundary: skip to the next candidate magic.
                nxt = buf.find(MAGIC, pos + 1)
                self.resyncs += 1
                pos = nxt if nxt >= 0 else max(pos + 1, len(buf) - len(MAGIC) + 1)
                continue
            _magic, length, stream, ftype, flags, _check_ = HEADER.unpack_from(buf, pos)
            end = pos + HEADER_SIZE + length
            if end > len(buf):
                break
            frames.append(Frame(ftype, stream, flags, bytes(buf[pos + HEADER_SIZE : end])))
            pos = end
        del buf[:pos]
        return frames
