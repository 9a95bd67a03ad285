"""A raw ttrpc client on blocking sockets: frames built once, no asyncio, no per-call objects.

The client must cost far less than the server it measures, since both share this machine's two
cores. So the request frame is encoded once per method and only its stream id changes; the
throughput driver multiplexes every connection from one thread with `selectors`.
"""

from __future__ import annotations

import selectors
import socket
import struct
import time
from pathlib import Path

from google.protobuf.message import Message

from podshim.ttrpc.codec import (
    MSG_REQUEST,
    MSG_RESPONSE,
    Frame,
    FrameDecoder,
    decode_response,
    encode_request,
)

TASK_SERVICE = "containerd.task.v2.Task"
_HEADER = struct.Struct(">IIBB")


def socket_path(bundle: Path) -> str:
    """The shim's socket, from the `address` file its `start` wrote into the bundle."""
    return (bundle / "address").read_text().strip().removeprefix("unix://")


class RpcError(RuntimeError):
    pass


class RawClient:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.decoder = FrameDecoder()
        self.next_id = 1

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, request: Message, response_type: type[Message]) -> Message:
        payload = self.call_raw(encode_request(TASK_SERVICE, method, request.SerializeToString()))
        resp = decode_response(payload)
        if resp.HasField("status") and resp.status.code != 0:
            raise RpcError(f"{method}: code {resp.status.code}: {resp.status.message}")
        return response_type.FromString(resp.payload)

    def call_raw(self, data: bytes) -> bytes:
        """Send one encoded Request, return the reply's payload (an encoded Response)."""
        sid = self.next_id
        self.next_id += 2
        self.sock.sendall(_HEADER.pack(len(data), sid, MSG_REQUEST, 0) + data)
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RpcError("connection closed")
            for frame in self.decoder.feed(chunk):
                if isinstance(frame, Frame) and frame.stream_id == sid and frame.msg_type == MSG_RESPONSE:
                    return bytes(frame.payload)


def latencies(path: str, method: str, request: Message, count: int) -> list[float]:
    """Sequential round trips on one connection, in seconds each."""
    data = encode_request(TASK_SERVICE, method, request.SerializeToString())
    out: list[float] = []
    with RawClient(path) as c:
        for _ in range(3):  # the first calls pay for the server's first-touch costs
            _check(c.call_raw(data), method)
        for _ in range(count):
            t0 = time.perf_counter()
            payload = c.call_raw(data)
            out.append(time.perf_counter() - t0)
        _check(payload, method)
    return out


def _check(payload: bytes, method: str) -> None:
    resp = decode_response(payload)
    if resp.HasField("status") and resp.status.code != 0:
        raise RpcError(f"{method}: code {resp.status.code}: {resp.status.message}")


def throughput(
    path: str, method: str, request: Message, *, connections: int, depth: int, total: int
) -> float:
    """Requests per second with `connections` connections, each keeping `depth` requests in
    flight (containerd pipelines its calls on a connection), until `total` replies came back."""
    data = encode_request(TASK_SERVICE, method, request.SerializeToString())
    prefix_len = len(data)
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    next_id: dict[int, int] = {}  # fd -> the connection's next stream id
    inbox: dict[int, bytearray] = {}  # fd -> bytes of replies not yet complete
    try:
        for _ in range(connections):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            socks.append(s)
            next_id[s.fileno()] = 1
            inbox[s.fileno()] = bytearray()
            sel.register(s, selectors.EVENT_READ)
        sent = received = 0
        checked = False

        def send(s: socket.socket, n: int) -> int:
            sid = next_id[s.fileno()]
            buf = bytearray()
            for _ in range(n):
                buf += _HEADER.pack(prefix_len, sid, MSG_REQUEST, 0)
                buf += data
                sid += 2
            next_id[s.fileno()] = sid
            s.sendall(buf)  # blocking: a few hundred bytes, the driver stays simple
            return n

        t0 = time.perf_counter()
        for s in socks:
            sent += send(s, min(depth, total - sent))
        while received < total:
            events = sel.select(timeout=10.0)
            if not events:
                raise RpcError(f"no reply within 10 s ({received}/{total} received)")
            for key, _ in events:
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                chunk = conn.recv(1 << 20)
                if not chunk:
                    raise RpcError("connection closed during the throughput run")
                buf = inbox[conn.fileno()]
                buf += chunk
                # Count whole frames by their headers; decode only the first reply, to check it.
                done = pos = 0
                while len(buf) - pos >= _HEADER.size:
                    size = _HEADER.size + _HEADER.unpack_from(buf, pos)[0]
                    if len(buf) - pos < size:
                        break
                    if not checked:
                        _check(bytes(buf[pos + _HEADER.size : pos + size]), method)
                        checked = True
                    pos += size
                    done += 1
                del buf[:pos]
                received += done
                more = min(done, total - sent)
                if more > 0:
                    sent += send(conn, more)
        elapsed = time.perf_counter() - t0
    finally:
        sel.close()
        for s in socks:
            s.close()
    return total / elapsed
