"""Copying stdio bytes, shared by the shim and the guest agent (standard library only).

Each copy is a generator that does its own reads and writes and yields a :class:`Wait` when it
cannot go on: an fd that would block, or a stream whose window has no room.  How to wait is the
caller's: the shim's event loop (:func:`podshim.system.stdio.drive`) or one of the agent's
threads (:func:`drive_blocking`).  So one piece of code handles EINTR, partial writes, a pty
whose last slave closed (EIO) and a reader gone for good, for every pump:

* fd to fd (:func:`copy`): the shim's FIFOs and pipes;
* fd to a channel stream (:func:`send_stream`) under a :class:`Window` of unacknowledged bytes:
  container output in the guest, local stdin in the shim's VM client;
* channel stream to fd (:class:`Sink`): stdin in the guest, container output in the shim.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable, Generator
from typing import NamedTuple

READ = "read"
WRITE = "write"
CREDIT = "credit"
CHUNK = 32 * 1024


class Wait(NamedTuple):
    kind: str  # READ, WRITE (fd would block) or CREDIT (the stream's window is full)
    fd: int


Steps = Generator[Wait, None, None]


def read_chunk(fd: int, size: int = CHUNK) -> Generator[Wait, None, bytes]:
    """The next bytes of fd; b"" at its end, or on EIO (a pty whose last slave closed)."""
    while True:
        try:
            return os.read(fd, size)
        except InterruptedError:
            continue
        except BlockingIOError:
            yield Wait(READ, fd)
        except OSError:
            return b""


def write_all(
    fd: int, data: bytes, progress: Callable[[], None] | None = None
) -> Generator[Wait, None, bool]:
    """Write all of data; False if the reader is gone for good (EPIPE and the like)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except BlockingIOError:
            yield Wait(WRITE, fd)
            continue
        except OSError:
            return False
        view = view[n:]
        if progress is not None:
            progress()
    return True


def copy(src: int, dst: int, progress: Callable[[], None] | None = None) -> Steps:
    """src to dst until src's end, or until dst's reader is gone."""
    while data := (yield from read_chunk(src)):
        if not (yield from write_all(dst, data, progress)):
            return


class Window:
    """A stream's unacknowledged bytes, at most ``size`` of them in flight.  Thread-safe: the
    agent acknowledges from its channel thread while a pump thread sends."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.unacked = 0
        self._cond = threading.Condition()

    @property
    def room(self) -> bool:
        return self.unacked < self.size

    def sent(self, n: int) -> None:
        with self._cond:
            self.unacked += n

    def ack(self, n: int) -> None:
        with self._cond:
            self.unacked = max(0, self.unacked - n)
            self._cond.notify_all()

    def reset(self) -> None:
        """A new session: the old one's unacknowledged bytes never will be."""
        with self._cond:
            self.unacked = 0
            self._cond.notify_all()

    def wait_room(self) -> None:
        with self._cond:
            while not self.room:
                self._cond.wait()


def send_stream(fd: int, window: Window, send: Callable[[bytes, bool], None], chunk: int = CHUNK) -> Steps:
    """fd's bytes as a stream: ``send(data, eof)`` for each chunk while the window has room, then
    ``send(b"", True)`` at fd's end.  A chunk never takes the stream past its window: the
    receiving end may hold the sender to it."""
    while True:
        if not window.room:
            yield Wait(CREDIT, fd)
            continue
        data = yield from read_chunk(fd, min(chunk, window.size - window.unacked))
        if not data:
            send(b"", True)
            return
        window.sent(len(data))
        send(data, False)


class Sink:
    """A stream's bytes into an fd, in order.  Once the fd's reader is gone, bytes are dropped:
    the caller still acknowledges them, so the sender is never stalled by a reader that left."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.broken = False

    def write(self, data: bytes) -> Steps:
        if not self.broken and not (yield from write_all(self.fd, data)):
            self.broken = True


def drive_blocking(steps: Steps, window: Window | None = None) -> None:
    """Run a copy on this thread: wait for an fd with select, for credit on ``window``."""
    for wait in steps:
        if wait.kind == CREDIT:
            assert window is not None
            window.wait_room()
        elif wait.kind == READ:
            select.select([wait.fd], [], [])
        else:
            select.select([], [wait.fd], [])
