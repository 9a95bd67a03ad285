"""The stdio pumps and the console hand-over: what must not block the shim's only loop, and
what must not leak an fd."""

from __future__ import annotations

import array
import asyncio
import os
import socket
import threading
from pathlib import Path

import pytest

from podshim.system import stdio
from podshim.system.stdio import ProcessIO, StdioConfig

BOUND = 5.0


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


async def test_receiving_the_console_master_does_not_block_the_loop() -> None:
    """The defect: a blocking recv on the console socket.  A runc that connected and stalled
    stopped every other request of the shim."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()

    def send() -> None:  # runc, late, from another thread so that a blocked loop cannot stop it
        theirs.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])

    timer = threading.Timer(0.3, send)
    timer.start()
    receiving = asyncio.ensure_future(stdio.receive_fds(ours))
    ticks = 0
    while not receiving.done():
        await asyncio.sleep(0.01)
        ticks += 1
    timer.join()
    fds = receiving.result()
    assert ticks >= 3, "the loop stood still while the console master was awaited"
    assert len(fds) == 1
    os.write(w, b"ok")
    assert os.read(fds[0], 2) == b"ok"
    for fd in (r, w, *fds):
        os.close(fd)
    ours.close()
    theirs.close()


async def test_a_console_peer_that_hangs_up_gives_no_fds() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    receiving = asyncio.ensure_future(stdio.receive_fds(ours))
    await asyncio.sleep(0)
    theirs.close()
    assert await asyncio.wait_for(receiving, BOUND) == []
    ours.close()


async def test_pump_copies_everything_through_a_full_destination() -> None:
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    payload = os.urandom(1 << 20)  # larger than a pipe buffer: the pump must wait for the reader

    async def feed() -> None:
        os.set_blocking(src_w, False)
        view = memoryview(payload)
        while view:
            try:
                view = view[os.write(src_w, view) :]
            except BlockingIOError:
                await stdio.writable(src_w)
        os.close(src_w)

    async def drain() -> bytes:
        os.set_blocking(dst_r, False)
        out = bytearray()
        while True:
            try:
                chunk = os.read(dst_r, 65536)
            except BlockingIOError:
                await stdio.readable(dst_r)
                continue
            if not chunk:
                return bytes(out)
            out += chunk

    async def pump() -> None:
        await stdio.copy(src_r, dst_w)
        os.close(dst_w)

    got, _, _ = await asyncio.wait_for(asyncio.gather(drain(), feed(), pump()), BOUND)
    assert got == payload
    for fd in (src_r, dst_r):
        os.close(fd)


async def test_fifo_stdio_reaches_the_client_and_close_releases_every_fd(tmp_path: Path) -> None:
    out = tmp_path / "stdout"
    os.mkfifo(out)
    before = open_fds()
    reader = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    pio = await ProcessIO.open(StdioConfig(stdout=str(out), stderr=str(out)), container_id="c", namespace="n")
    assert pio.child_stdio is not None
    _, child_out, _ = pio.child_stdio
    os.write(child_out, b"hello\n")
    pio.started()  # closes the child's ends: only "the process" held them
    await stdio.readable(reader)
    assert os.read(reader, 100) == b"hello\n"
    await asyncio.wait_for(pio.close(), BOUND)
    os.close(reader)
    assert open_fds() == before


async def test_drain_returns_when_output_stalls() -> None:
    """A daemonised grandchild holding stdout open must not hold Delete for ever."""
    r, w = os.pipe()
    dst_r, dst_w = os.pipe()
    pio = ProcessIO(StdioConfig())
    pio._spawn_copy(r, dst_w)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.wait_for(pio.drain(idle=0.05, limit=BOUND), BOUND)
    assert loop.time() - start < BOUND
    await pio.close()
    os.close(w)
    os.close(dst_r)


@pytest.mark.parametrize("scheme", ["bogus"])
async def test_an_unknown_scheme_is_invalid_argument(scheme: str) -> None:
    from podshim import errdefs

    with pytest.raises(errdefs.InvalidArgument):
        await ProcessIO.open(StdioConfig(stdout=f"{scheme}:///x"), container_id="c", namespace="n")
