"""Hypothesis against the ttrpc server's dispatch with whole frames, into the real Task API.

The server runs the shim's TaskService (no pod yet, so nothing reaches runc) on a unix socket
in a thread of its own; every example is one connection sending arbitrary whole frames:
requests for real and made-up methods, real request messages with arbitrary fields, garbage
payloads, odd and even stream ids, arbitrary deadlines, frames of other types.  Whatever comes,
every request frame gets exactly one well-formed response frame on its stream, and the server
still answers a plain request afterwards.

The default run tries ``PODSHIM_FUZZ_EXAMPLES`` examples (50); the soak run, 10^5.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podshim import options
from podshim.api import task_pb2
from podshim.service import SERVICE, TaskService
from podshim.ttrpc.codec import (
    HEADER,
    MSG_REQUEST,
    MSG_RESPONSE,
    decode_response,
    encode_frame,
    encode_request,
)
from podshim.ttrpc.server import Server

DEFAULT_EXAMPLES = int(os.environ.get("PODSHIM_FUZZ_EXAMPLES", "50"))
SOAK_EXAMPLES = 100_000
BOUND = 10.0
SENTINEL = 0x7FFFFFFF  # the highest odd stream id: never drawn below

T = task_pb2
REQUEST_TYPES: dict[str, type[Message]] = {
    "State": T.StateRequest, "Create": T.CreateTaskRequest, "Start": T.StartRequest,
    "Delete": T.DeleteRequest, "Pids": T.PidsRequest, "Pause": T.PauseRequest,
    "Resume": T.ResumeRequest, "Checkpoint": T.CheckpointTaskRequest, "Kill": T.KillRequest,
    "Exec": T.ExecProcessRequest, "ResizePty": T.ResizePtyRequest, "CloseIO": T.CloseIORequest,
    "Update": T.UpdateTaskRequest, "Wait": T.WaitRequest, "Stats": T.StatsRequest,
    "Connect": T.ConnectRequest, "Shutdown": T.ShutdownRequest,
}  # fmt: skip


class NullEvents:
    def publish(self, topic: str, event: Message) -> None:
        pass


class ServerThread:
    """The server on its own loop, in a thread: the hypothesis examples talk to it with plain
    blocking sockets."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.server: Server | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        service = TaskService(namespace="fuzz", events=NullEvents(), start_options=options.ShimOptions(),
                              on_shutdown=lambda: None)  # fmt: skip
        self.server = Server({SERVICE: service.methods()})
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        sock.listen(16)
        sock.setblocking(False)
        serving = asyncio.ensure_future(self.server.serve(sock))
        self.ready.set()
        await serving

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(BOUND)

    def stop(self) -> None:
        assert self.server is not None
        asyncio.run_coroutine_threadsafe(self.server.close(grace=0.1), self.loop).result(BOUND)
        self.thread.join(BOUND)
        self.loop.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    path = str(Path(tmp_path_factory.mktemp("fuzz")) / "s.sock")
    srv = ServerThread(path)
    srv.start()
    yield srv
    # Every example closed its connection: the server holds none of them any more.
    assert srv.server is not None
    deadline = time.monotonic() + BOUND
    while srv.server.connection_count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.server.connection_count == 0
    srv.stop()


# -- strategies ---------------------------------------------------------------------------------

_text = st.text(max_size=24)


@st.composite
def request_message(draw: st.DrawFn, method: str) -> bytes:
    """A real request of ``method`` with arbitrary scalar fields."""
    msg = REQUEST_TYPES[method]()
    for f in msg.DESCRIPTOR.fields:
        if f.label == FieldDescriptor.LABEL_REPEATED or f.type == FieldDescriptor.TYPE_MESSAGE:
            continue
        if not draw(st.booleans()):
            continue
        value: Any
        if f.type == FieldDescriptor.TYPE_STRING:
            value = draw(st.one_of(_text, st.sampled_from(["", "/", "..", "c1", "/tmp"])))
        elif f.type == FieldDescriptor.TYPE_BOOL:
            value = draw(st.booleans())
        elif f.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
            value = draw(st.integers(0, 2**32 - 1))
        elif f.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32):
            value = draw(st.integers(-(2**31), 2**31 - 1))
        elif f.type in (FieldDescriptor.TYPE_UINT64,):
            value = draw(st.integers(0, 2**64 - 1))
        elif f.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
            value = draw(st.integers(-(2**63), 2**63 - 1))
        else:
            continue
        setattr(msg, f.name, value)
    return msg.SerializeToString()


@st.composite
def frame(draw: st.DrawFn) -> tuple[int, int, bytes]:
    """(stream id, type, payload) of one whole frame."""
    sid = draw(st.one_of(st.integers(0, 40), st.integers(0, SENTINEL - 1)))
    kind = draw(st.sampled_from(["request", "request", "request", "garbage", "other-type"]))
    if kind == "other-type":
        return sid, draw(st.sampled_from([0, MSG_RESPONSE, 3, 255])), draw(st.binary(max_size=64))
    if kind == "garbage":
        return sid, MSG_REQUEST, draw(st.binary(max_size=64))
    service = draw(st.sampled_from([SERVICE, SERVICE, "", "containerd.task.v3.Task"]))
    method = draw(st.sampled_from([*REQUEST_TYPES, "", "Nope"]))
    if method in REQUEST_TYPES and draw(st.booleans()):
        payload = draw(request_message(method))
    else:
        payload = draw(st.binary(max_size=64))
    timeout = draw(st.sampled_from([0, 0, 1, -1, 10**6, 2**63 - 1, -(2**63)]))
    metadata = draw(st.lists(st.tuples(_text, _text), max_size=3))
    return sid, MSG_REQUEST, encode_request(service, method, payload, timeout, metadata)


# -- the property -------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise AssertionError("the server closed the connection")
        out += chunk
    return bytes(out)


def exchange(path: str, frames: list[tuple[int, int, bytes]]) -> None:
    expected = collections.Counter(sid for sid, t, _ in frames if t == MSG_REQUEST)
    expected[SENTINEL] += 1
    sentinel = encode_request(SERVICE, "Connect", task_pb2.ConnectRequest(id="none").SerializeToString())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(BOUND)
        sock.connect(path)
        sock.sendall(b"".join(encode_frame(sid, t, p) for sid, t, p in frames))
        sock.sendall(encode_frame(SENTINEL, MSG_REQUEST, sentinel))
        got: collections.Counter[int] = collections.Counter()
        sentinel_ok = False
        while got != expected:
            length, sid, mtype, _ = HEADER.unpack(_recv_exact(sock, HEADER.size))
            resp = decode_response(_recv_exact(sock, length))  # well-formed, or this raises
            assert mtype == MSG_RESPONSE
            got[sid] += 1
            assert got[sid] <= expected[sid], f"stream {sid} answered more often than asked"
            if sid == SENTINEL:
                sentinel_ok = resp.status.code == 0
        assert sentinel_ok, "the server stopped serving well-formed requests"


FRAMES = st.lists(frame(), max_size=12)


@settings(max_examples=DEFAULT_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=FRAMES)
def test_every_request_frame_gets_one_response_and_the_server_keeps_serving(
    server: ServerThread, frames: list[tuple[int, int, bytes]]
) -> None:
    exchange(server.path, frames)


@pytest.mark.soak
@pytest.mark.timeout(4 * 3600)
@settings(max_examples=SOAK_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=FRAMES)
def test_server_dispatch_soak(server: ServerThread, frames: list[tuple[int, int, bytes]]) -> None:
    exchange(server.path, frames)
