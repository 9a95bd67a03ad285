"""The stdio pumps the shim and the guest agent share (podshim.system.pump), driven both ways:
on the shim's event loop (stdio.drive, non-blocking fds) and on a thread (drive_blocking)."""

from __future__ import annotations

import asyncio
import os
import pty
import threading

from podshim.system import pump
from podshim.system.stdio import copy, drive

BIG = os.urandom(1 << 20)  # several pipe buffers: the copy must wait for the reader


def _read_all(fd: int, into: bytearray) -> threading.Thread:
    def run() -> None:
        while chunk := os.read(fd, 65536):
            into.extend(chunk)
        os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    return t


def _write_and_close(fd: int, data: bytes) -> threading.Thread:
    def run() -> None:
        os.write(fd, data)
        os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_copy_on_a_thread_with_blocking_fds() -> None:
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    got = bytearray()
    reader, writer = _read_all(dst_r, got), _write_and_close(src_w, BIG)
    pump.drive_blocking(pump.copy(src_r, dst_w))
    os.close(dst_w)
    writer.join(10)
    reader.join(10)
    os.close(src_r)
    assert bytes(got) == BIG


async def test_copy_on_the_loop_waits_for_fds_and_reports_progress() -> None:
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    got = bytearray()
    progress: list[int] = []
    reader, writer = _read_all(dst_r, got), _write_and_close(src_w, BIG)
    async with asyncio.timeout(30):
        await copy(src_r, dst_w, lambda: progress.append(1))
    os.close(dst_w)
    await asyncio.to_thread(writer.join, 10)
    await asyncio.to_thread(reader.join, 10)
    os.close(src_r)
    assert bytes(got) == BIG
    assert progress


def test_a_pty_whose_slave_closed_is_the_end_not_an_error() -> None:
    master, slave = pty.openpty()
    os.write(slave, b"last words\n")
    os.close(slave)
    steps = pump.read_chunk(master)
    chunks = []
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            chunks.append(stop.value)
            if not stop.value:
                break
            steps = pump.read_chunk(master)
    os.close(master)
    assert b"".join(chunks).replace(b"\r", b"") == b"last words\n"


def test_a_sink_whose_reader_left_drops_bytes_and_keeps_going() -> None:
    r, w = os.pipe()
    os.close(r)
    sink = pump.Sink(w)
    pump.drive_blocking(sink.write(b"nobody reads this"))
    assert sink.broken
    pump.drive_blocking(sink.write(b"nor this"))  # no error: acknowledged and dropped
    os.close(w)


def test_send_stream_on_a_thread_stops_at_the_window_until_acked() -> None:
    r, w = os.pipe()
    window = pump.Window(64 * 1024)
    sent: list[tuple[bytes, bool]] = []
    writer = _write_and_close(w, BIG[: 256 * 1024])
    t = threading.Thread(
        target=pump.drive_blocking,
        args=(pump.send_stream(r, window, lambda d, e: sent.append((d, e)), 16384), window),
    )
    t.start()
    while window.room:  # fills to the window, then waits for credit
        assert t.is_alive()
    t.join(0.2)
    assert t.is_alive() and sum(len(d) for d, _ in sent) == window.size  # never past it
    while t.is_alive():
        window.ack(window.unacked)
        t.join(0.01)
    writer.join(10)
    os.close(r)
    assert b"".join(d for d, _ in sent) == BIG[: 256 * 1024] and sent[-1] == (b"", True)


async def test_send_stream_on_the_loop_waits_for_credit() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    window = pump.Window(32 * 1024)
    credit = asyncio.Event()
    sent: list[tuple[bytes, bool]] = []

    async def wait_credit() -> None:
        while not window.room:
            credit.clear()
            await credit.wait()

    writer = _write_and_close(w, BIG[: 128 * 1024])
    task = asyncio.get_running_loop().create_task(
        drive(pump.send_stream(r, window, lambda d, e: sent.append((d, e)), 8192), wait_credit)
    )
    async with asyncio.timeout(30):
        while not task.done():
            await asyncio.sleep(0.01)
            if not window.room:
                window.ack(window.unacked)
                credit.set()
    await asyncio.to_thread(writer.join, 10)
    os.close(r)
    assert b"".join(d for d, _ in sent) == BIG[: 128 * 1024] and sent[-1] == (b"", True)
