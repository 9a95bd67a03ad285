from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podshim.api import task_pb2
from podshim.api.ttrpc_pb2 import Request, Response
from podshim.errdefs import Code
from podshim.ttrpc.codec import (
    HEADER,
    HEADER_SIZE,
    MAX_MESSAGE,
    MSG_REQUEST,
    MSG_RESPONSE,
    Frame,
    FrameDecoder,
    OversizedFrame,
    PayloadError,
    decode_request,
    decode_response,
    encode_frame,
    encode_request,
    encode_response,
    encode_response_frame,
    encode_status_frame,
    status_response,
)

# Spec §2.2 worked example: Connect{id:"spy1"} on stream 3 and its reply.
CONNECT_FRAME = bytes.fromhex("0000002a 00000003 01 00".replace(" ", "")) + (
    b"\x0a\x17containerd.task.v2.Task\x12\x07Connect\x1a\x06\x0a\x04spy1"
)
CONNECT_REPLY = bytes.fromhex("00000008 00000003 02 00 12 06 08 e4 5c 10 c4 5d".replace(" ", ""))


def test_encode_matches_go_wire_bytes() -> None:
    payload = encode_request(
        "containerd.task.v2.Task", "Connect", task_pb2.ConnectRequest(id="spy1").SerializeToString()
    )
    assert encode_frame(3, MSG_REQUEST, payload) == CONNECT_FRAME
    reply = task_pb2.ConnectResponse(shim_pid=11876, task_pid=11972).SerializeToString()
    assert encode_response_frame(3, reply) == CONNECT_REPLY


def test_decode_go_wire_bytes() -> None:
    [frame] = FrameDecoder().feed(CONNECT_FRAME)
    assert isinstance(frame, Frame)
    assert (frame.stream_id, frame.msg_type, frame.flags) == (3, MSG_REQUEST, 0)
    req = decode_request(frame.payload)
    assert (req.service, req.method) == ("containerd.task.v2.Task", "Connect")
    assert task_pb2.ConnectRequest.FromString(req.payload).id == "spy1"


def test_empty_reply_is_zero_length_frame() -> None:
    assert encode_response(b"") == b""
    assert encode_response_frame(7, b"") == bytes.fromhex("00000000000000070200")


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16384, 2**21 + 5])
def test_hand_encoded_response_matches_protobuf(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert encode_response(payload) == Response(payload=payload).SerializeToString()
    assert encode_response_frame(1, payload) == encode_frame(1, MSG_RESPONSE, encode_response(payload))


def test_status_response_round_trip() -> None:
    frame = encode_status_frame(5, Code.NOT_FOUND, "process already finished: not found")
    # Spec §2.2: the verified error reply body.
    assert frame[HEADER_SIZE:] == bytes.fromhex("0a27 0805 1223") + b"process already finished: not found"
    resp = decode_response(status_response(Code.NOT_FOUND, "x"))
    assert resp.HasField("status") and resp.status.code == Code.NOT_FOUND and resp.status.message == "x"
    assert not resp.payload


def test_byte_by_byte_feed() -> None:
    decoder = FrameDecoder()
    events = []
    data = CONNECT_FRAME + CONNECT_REPLY
    for i in range(len(data)):
        events += decoder.feed(data[i : i + 1])
    assert events == [
        Frame(3, MSG_REQUEST, 0, CONNECT_FRAME[HEADER_SIZE:]),
        Frame(3, MSG_RESPONSE, 0, CONNECT_REPLY[HEADER_SIZE:]),
    ]
    assert decoder.buffered == 0


def test_many_frames_in_one_chunk_with_trailing_partial() -> None:
    frames = [encode_frame(i, MSG_REQUEST, bytes([i]) * i) for i in range(1, 20, 2)]
    data = b"".join(frames)
    decoder = FrameDecoder()
    events = decoder.feed(data + frames[0][:4])
    assert [e.stream_id for e in events] == list(range(1, 20, 2))
    assert all(isinstance(e, Frame) and e.payload == bytes([e.stream_id]) * e.stream_id for e in events)
    assert decoder.buffered == 4
    assert decoder.feed(frames[0][4:]) == [Frame(1, MSG_REQUEST, 0, b"\x01")]


def test_unknown_type_and_flags_are_passed_through() -> None:
    assert FrameDecoder().feed(encode_frame(9, 0x03, b"abc", flags=0x05)) == [Frame(9, 3, 5, b"abc")]


def test_oversized_frame_is_skipped_in_pieces_without_buffering() -> None:
    length = MAX_MESSAGE + 1
    header = HEADER.pack(length, 11, MSG_REQUEST, 0)
    follow = encode_frame(13, MSG_REQUEST, b"ok")
    decoder = FrameDecoder()
    assert decoder.feed(header + b"x" * 1000) == []
    chunk = b"y" * 65536
    remaining = length - 1000
    while remaining > len(chunk):
        assert decoder.feed(chunk) == []
        assert decoder.buffered == 0  # never holds the oversized payload
        remaining -= len(chunk)
    # Last piece of the oversized payload and the next frame arrive together.
    events = decoder.feed(b"z" * remaining + follow)
    assert events == [OversizedFrame(11, MSG_REQUEST, length), Frame(13, MSG_REQUEST, 0, b"ok")]


def test_oversized_frame_fully_in_one_chunk() -> None:
    decoder = FrameDecoder(max_message=4)
    data = encode_frame(1, MSG_REQUEST, b"12345") + encode_frame(3, MSG_REQUEST, b"1234")
    assert decoder.feed(data) == [OversizedFrame(1, MSG_REQUEST, 5), Frame(3, MSG_REQUEST, 0, b"1234")]


def test_exactly_max_is_not_oversized() -> None:
    decoder = FrameDecoder(max_message=8)
    assert decoder.feed(encode_frame(1, 2, b"8" * 8)) == [Frame(1, 2, 0, b"8" * 8)]


def test_memoryview_and_bytearray_input() -> None:
    data = bytearray(CONNECT_FRAME)
    decoder = FrameDecoder()
    assert len(decoder.feed(memoryview(data)[:5])) == 0
    assert len(decoder.feed(data[5:])) == 1


def test_request_metadata_and_timeout() -> None:
    raw = encode_request("s", "m", b"p", timeout_nano=123, metadata=[("k", "v"), ("k", "w")])
    req = decode_request(raw)
    assert req.timeout_nano == 123
    assert [(kv.key, kv.value) for kv in req.metadata] == [("k", "v"), ("k", "w")]


def test_garbage_request_raises_payload_error() -> None:
    with pytest.raises(PayloadError):
        decode_request(b"\xff\xff\xff")
    with pytest.raises(PayloadError):
        decode_response(b"\x0a\x05\x08")


# -- property tests ----------------------------------------------------------------------

frames_st = st.lists(
    st.tuples(
        st.integers(0, 2**32 - 1),
        st.integers(0, 255),
        st.integers(0, 255),
        st.binary(max_size=300),
    ),
    max_size=12,
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, prev = [], 0
    for p in [*points, len(data)]:
        chunks.append(data[prev:p])
        prev = p
    return chunks


@settings(max_examples=300)
@given(frames=frames_st, cuts=st.lists(st.integers(0, 10_000), max_size=20), limit=st.integers(0, 400))
def test_round_trip_any_frames_any_split(
    frames: list[tuple[int, int, int, bytes]], cuts: list[int], limit: int
) -> None:
    data = b"".join(encode_frame(sid, t, p, flags=f) for sid, t, f, p in frames)
    decoder = FrameDecoder(max_message=limit)
    events = []
    for chunk in _split(data, cuts):
        events += decoder.feed(chunk)
    expected = [
        Frame(sid, t, f, p) if len(p) <= limit else OversizedFrame(sid, t, len(p)) for sid, t, f, p in frames
    ]
    assert events == expected
    assert decoder.buffered == 0


@settings(max_examples=300)
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 5000), max_size=10))
def test_garbage_never_raises_and_split_does_not_matter(data: bytes, cuts: list[int]) -> None:
    whole = FrameDecoder(max_message=512).feed(data)
    pieces = FrameDecoder(max_message=512)
    split = [e for chunk in _split(data, cuts) for e in pieces.feed(chunk)]
    assert split == whole
    for event in whole:
        if isinstance(event, Frame):
            with contextlib.suppress(PayloadError):  # the only error garbage may produce
                decode_request(event.payload)


@given(
    service=st.text(max_size=40),
    method=st.text(max_size=40),
    payload=st.binary(max_size=200),
    timeout=st.integers(-(2**63), 2**63 - 1),
    metadata=st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10)), max_size=4),
)
def test_request_round_trip(
    service: str, method: str, payload: bytes, timeout: int, metadata: list[tuple[str, str]]
) -> None:
    req = decode_request(encode_request(service, method, payload, timeout, metadata))
    assert isinstance(req, Request)
    assert (req.service, req.method, req.payload, req.timeout_nano) == (service, method, payload, timeout)
    assert [(kv.key, kv.value) for kv in req.metadata] == metadata


def test_receive_buffer_is_lazy_small_and_grows_after_a_full_read() -> None:
    from podshim.ttrpc.codec import RECV_BUFFER, SMALL_RECV_BUFFER, ReceiveBuffer

    buf = ReceiveBuffer()
    assert buf._view is None  # a connection that never reads costs no buffer
    view = buf.get()
    assert len(view) == SMALL_RECV_BUFFER
    view[:3] = b"abc"
    assert bytes(buf.received(3)) == b"abc"
    assert len(buf.get()) == SMALL_RECV_BUFFER  # a partial read keeps it small
    view = buf.get()
    view[:] = b"x" * SMALL_RECV_BUFFER
    assert bytes(buf.received(SMALL_RECV_BUFFER)) == b"x" * SMALL_RECV_BUFFER  # still the data read
    assert len(buf.get()) == RECV_BUFFER
