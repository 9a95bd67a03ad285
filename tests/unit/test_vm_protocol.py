"""The shim <-> guest agent protocol: framing, resynchronisation, and the agent's session logic
over a socketpair standing in for the virtio-serial port (no VM, no runc)."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podshim.guest import protocol as P
from podshim.guest.agent import Agent
from podshim.guest.channel import Channel
from podshim.guest.containers import Container, Proc
from podshim.guest.stdio import Stdio


def test_round_trip_json_and_data() -> None:
    wire = P.encode_json(P.REQUEST, 7, {"op": "ping"}) + P.encode(P.DATA, 3, b"\x00\xffbytes", P.FLAG_EOF)
    frames = P.Decoder().feed(wire)
    assert [(f.type, f.stream, f.flags) for f in frames] == [(P.REQUEST, 7, 0), (P.DATA, 3, P.FLAG_EOF)]
    assert P.decode_json(frames[0].payload) == {"op": "ping"}
    assert frames[1].payload == b"\x00\xffbytes"


def test_byte_at_a_time() -> None:
    wire = P.encode_json(P.EVENT, 0, {"event": "exit", "status": 3}) + P.encode_ack(5, 1234)
    dec = P.Decoder()
    frames = [f for b in wire for f in dec.feed(bytes([b]))]
    assert len(frames) == 2 and dec.buffered == 0
    assert P.decode_ack(frames[1].payload) == 1234


def test_resync_after_a_torn_frame() -> None:
    """A new connection may start with the tail of a frame written for the old one."""
    torn = P.encode(P.DATA, 1, b"x" * 100)[37:]
    good = P.encode_json(P.HELLO, 0, {"session": 9})
    dec = P.Decoder()
    frames = dec.feed(torn + good)
    assert [P.decode_json(f.payload) for f in frames] == [{"session": 9}]
    assert dec.resyncs > 0


def test_a_corrupt_header_is_skipped_not_trusted() -> None:
    bad = bytearray(P.encode(P.DATA, 1, b"payload"))
    bad[8] ^= 0xFF  # the stream id: the header check no longer matches
    good = P.encode(P.DATA, 2, b"ok")
    frames = P.Decoder().feed(bytes(bad) + good)
    assert [(f.stream, f.payload) for f in frames] == [(2, b"ok")]


def test_an_oversized_length_is_not_a_frame() -> None:
    header = P.HEADER.pack(P.MAGIC, P.MAX_PAYLOAD + 1, 1, P.DATA, 0, 0)[:-2]
    fake = header + P._check(header).to_bytes(2, "big")
    frames = P.Decoder().feed(fake + P.encode(P.DATA, 4, b"real"))
    assert [f.stream for f in frames] == [4]


def test_encode_limits_and_json_errors() -> None:
    with pytest.raises(ValueError):
        P.encode(P.DATA, 1, b"x" * (P.MAX_PAYLOAD + 1))
    with pytest.raises(P.ProtocolError):
        P.decode_json(b"[1, 2]")
    with pytest.raises(P.ProtocolError):
        P.decode_json(b"{not json")
    with pytest.raises(P.ProtocolError):
        P.decode_ack(b"\x00")


@settings(max_examples=200, deadline=None)
@given(
    garbage=st.binary(max_size=64),
    payloads=st.lists(st.binary(max_size=3000), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=1, max_value=5000), max_size=10),
)
def test_any_chunking_after_any_garbage(garbage: bytes, payloads: list[bytes], cuts: list[int]) -> None:
    # A HELLO first, as a session begins: everything after it must come through intact.
    hello = P.encode_json(P.HELLO, 0, {"session": 1})
    wire = garbage + hello + b"".join(P.encode(P.DATA, i + 1, p) for i, p in enumerate(payloads))
    dec = P.Decoder()
    frames: list[P.Frame] = []
    pos = 0
    for n in cuts:
        frames += dec.feed(wire[pos : pos + n])
        pos += n
    frames += dec.feed(wire[pos:])
    start = next(i for i, f in enumerate(frames) if f.type == P.HELLO)
    assert [(f.stream, f.payload) for f in frames[start + 1 :]] == [
        (i + 1, p) for i, p in enumerate(payloads)
    ]


# -- the agent's session logic --------------------------------------------------------------------


class Host:
    """The shim's end of a socketpair whose other end the agent serves."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dec = P.Decoder()
        self.frames: list[P.Frame] = []

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def next(self, ftype: int) -> P.Frame:
        while True:
            for i, f in enumerate(self.frames):
                if f.type == ftype:
                    return self.frames.pop(i)
            data = self.sock.recv(65536)
            assert data, "the agent closed the channel"
            self.frames += self.dec.feed(data)


# The agents' threads serve forever: their sockets stay open, so they never see the host go and
# never log it over the test output.
_KEEP: list[socket.socket] = []


@pytest.fixture
def agent_host() -> tuple[Agent, Host]:
    ours, theirs = socket.socketpair()
    _KEEP.extend((ours, theirs))
    ours.settimeout(10)
    agent = Agent(Channel(os.dup(theirs.fileno())))
    threading.Thread(target=agent.serve, daemon=True).start()
    return agent, Host(ours)


def test_agent_session_requests_and_errors(agent_host: tuple[Agent, Host]) -> None:
    agent, host = agent_host
    # Leftover bytes of an earlier connection come first; the HELLO still gets through.
    host.send(b"\x13garbage" + P.encode(P.DATA, 5, b"old")[:20])
    host.send(P.encode_json(P.HELLO, 0, {"session": 41}))
    hello = P.decode_json(host.next(P.HELLO).payload)
    assert hello == {"session": 41, "processes": []}

    host.send(P.encode_json(P.REQUEST, 1, {"op": "ping"}))
    resp = host.next(P.RESPONSE)
    assert resp.stream == 1 and P.decode_json(resp.payload)["ok"] is True

    # Nothing touches containers before the host set the VM up (a clone's random state is
    # the template's until then); a setup without enough host entropy is refused.
    host.send(P.encode_json(P.REQUEST, 2, {"op": "start", "id": "nope"}))
    resp = P.decode_json(host.next(P.RESPONSE).payload)
    assert resp["error"] == "failed_precondition" and "set up" in resp["message"], resp
    host.send(P.encode_json(P.REQUEST, 5, {"op": "setup", "entropy": "c2hvcnQ="}))
    resp = P.decode_json(host.next(P.RESPONSE).payload)
    assert resp["error"] == "invalid_argument" and "entropy" in resp["message"], resp
    assert not agent.set_up
    agent.set_up = True
    host.send(P.encode_json(P.REQUEST, 2, {"op": "start", "id": "nope"}))
    resp = host.next(P.RESPONSE)
    assert P.decode_json(resp.payload)["error"] == "not_found"

    host.send(P.encode_json(P.REQUEST, 3, {"op": "no-such-op"}))
    assert P.decode_json(host.next(P.RESPONSE).payload)["error"] == "invalid_argument"

    host.send(P.encode_json(P.REQUEST, 4, {"op": "crash"}))
    assert P.decode_json(host.next(P.RESPONSE).payload)["error"] == "failed_precondition"


def test_agent_snapshot_carries_exits_across_sessions(agent_host: tuple[Agent, Host]) -> None:
    """An exit that happened with no host connected is in the next session's HELLO answer."""
    agent, host = agent_host
    host.send(P.encode_json(P.HELLO, 0, {"session": 1}))
    host.next(P.HELLO)
    c = Container(agent, "c1", "/b")
    c.init = Proc(c, "", Stdio.__new__(Stdio))
    c.init.pid = 42
    agent.containers["c1"] = c
    agent.process_exited(c.init, 137)
    ev = P.decode_json(host.next(P.EVENT).payload)
    assert ev == {"event": "exit", "id": "c1", "exec_id": "", "pid": 42, "status": 137}

    host.send(P.encode_json(P.HELLO, 0, {"session": 2}))
    hello = P.decode_json(host.next(P.HELLO).payload)
    assert hello["session"] == 2
    assert hello["processes"] == [{"id": "c1", "exec_id": "", "pid": 42, "exited": True, "status": 137}]


def test_agent_stdin_stream_is_acknowledged(agent_host: tuple[Agent, Host]) -> None:
    agent, host = agent_host
    r, w = os.pipe()
    agent.add_stream("in", 9, w)
    host.send(P.encode(P.DATA, 9, b"hello"))
    ack = host.next(P.ACK)
    assert (ack.stream, P.decode_ack(ack.payload)) == (9, 5)
    host.send(P.encode(P.DATA, 9, b"", P.FLAG_EOF))
    assert os.read(r, 100) == b"hello"
    assert os.read(r, 100) == b""  # EOF once the host closed the stream
    os.close(r)


def test_agent_output_stream_respects_the_window(agent_host: tuple[Agent, Host]) -> None:
    agent, host = agent_host
    r, w = os.pipe()
    agent.add_stream("out", 3, r)
    blob = os.urandom(P.WINDOW + 50_000)
    writer = threading.Thread(target=lambda: (os.write(w, blob), os.close(w)))
    writer.start()
    got = b""
    while len(got) < P.WINDOW:
        got += host.next(P.DATA).payload
    # The agent stops at the window until the host acknowledges.
    host.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        host.next(P.DATA)
    host.sock.settimeout(10)
    host.send(P.encode_ack(3, len(got)))
    while True:
        f = host.next(P.DATA)
        got += f.payload
        if f.flags & P.FLAG_EOF:
            break
    writer.join()
    assert got == blob


def test_json_frames_are_compact() -> None:
    frame = P.encode_json(P.EVENT, 0, {"a": 1})
    assert frame[P.HEADER_SIZE :] == json.dumps({"a": 1}, separators=(",", ":")).encode()
