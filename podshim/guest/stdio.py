"""Each process's stdio as DATA streams: pipes, or the pty runc hands back."""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import socket
import threading
from typing import TYPE_CHECKING, Any

from podshim.guest import protocol as P
from podshim.guest.errors import AgentError
from podshim.guest.paths import STATE
from podshim.system import pump
from podshim.system.fds import close_fds

if TYPE_CHECKING:
    from podshim.guest.session import Session


class OutStream:
    """A process's output: its pipe (or pty) as DATA frames within the window (shared pump)."""

    def __init__(self, agent: Session, sid: int, fd: int) -> None:
        self.agent, self.sid, self.fd = agent, sid, fd
        self.window = pump.Window(P.WINDOW)
        self.done = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"out-{self.sid}", daemon=True).start()

    def ack(self, n: int) -> None:
        self.window.ack(n)

    def reset_window(self) -> None:
        self.window.reset()

    def _send(self, data: bytes, eof: bool) -> None:
        self.agent.chan.send(P.encode(P.DATA, self.sid, data, P.FLAG_EOF if eof else 0))

    def _run(self) -> None:
        try:
            pump.drive_blocking(pump.send_stream(self.fd, self.window, self._send, P.DATA_CHUNK), self.window)
        finally:
            close_fds(self.fd)
            self.done.set()
            self.agent.forget_stream(self.sid)


class InStream:
    """A process's stdin: DATA frames from the host, written by a thread of its own so that a
    container that does not read its stdin blocks only this stream (shared pump)."""

    def __init__(self, agent: Session, sid: int, fd: int) -> None:
        self.agent, self.sid, self.fd = agent, sid, fd
        self._queue: collections.deque[tuple[bytes, bool]] = collections.deque()
        self._cond = threading.Condition()

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"in-{self.sid}", daemon=True).start()

    def push(self, data: bytes, eof: bool) -> None:
        with self._cond:
            self._queue.append((data, eof))
            self._cond.notify_all()

    def close(self) -> None:
        self.push(b"", True)

    def _run(self) -> None:
        sink = pump.Sink(self.fd)
        try:
            while True:
                with self._cond:
                    while not self._queue:
                        self._cond.wait()
                    data, eof = self._queue.popleft()
                pump.drive_blocking(sink.write(data))
                if data:
                    self.agent.chan.send(P.encode_ack(self.sid, len(data)))
                if eof:
                    return
        finally:
            close_fds(self.fd)
            self.agent.forget_stream(self.sid)


_console_ids = itertools.count(1)


class Stdio:
    """The agent's side of one process's stdio, and the child's ends for runc."""

    def __init__(self, agent: Session, spec: dict[str, Any], name: str) -> None:
        self.agent = agent
        self.stdin_sid = int(spec.get("stdin") or 0)
        self.stdout_sid = int(spec.get("stdout") or 0)
        self.stderr_sid = int(spec.get("stderr") or 0)
        self.terminal = bool(spec.get("terminal"))
        self.child: dict[int, int] = {}
        self._parent: list[tuple[str, int, int]] = []  # (direction, sid, fd)
        self.console_path = ""
        self._console: socket.socket | None = None
        self.master = -1
        if self.terminal:
            # Numbered, not named: container ids alone can exceed sun_path's 108 bytes.
            self.console_path = os.path.join(STATE, f"console-{next(_console_ids)}.sock")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.console_path)
            self._console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._console.bind(self.console_path)
            self._console.listen(1)
            self._console.settimeout(30)
            return
        if self.stdin_sid:
            r, w = os.pipe()
            self.child[0] = r
            self._parent.append(("in", self.stdin_sid, w))
        if self.stdout_sid:
            r, w = os.pipe()
            self.child[1] = w
            self._parent.append(("out", self.stdout_sid, r))
        if self.stderr_sid:
            if self.stderr_sid == self.stdout_sid:
                self.child[2] = self.child[1]
            else:
                r, w = os.pipe()
                self.child[2] = w
                self._parent.append(("out", self.stderr_sid, r))

    def receive_console(self) -> None:
        """After runc create/exec returned: take the pty master runc sent to the console socket."""
        assert self._console is not None
        try:
            conn, _ = self._console.accept()
            with conn:
                _msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
        finally:
            self._console.close()
            self._console = None
            with contextlib.suppress(OSError):
                os.unlink(self.console_path)
        if not fds:
            raise AgentError("runc sent no console master")
        self.master = fds[0]
        if self.stdin_sid:
            self._parent.append(("in", self.stdin_sid, os.dup(self.master)))
        if self.stdout_sid:
            self._parent.append(("out", self.stdout_sid, os.dup(self.master)))

    def started(self) -> None:
        """The process holds its ends: close ours and start copying."""
        close_fds(*set(self.child.values()))
        self.child.clear()
        for direction, sid, fd in self._parent:
            self.agent.add_stream(direction, sid, fd)
        self._parent.clear()

    def resize(self, width: int, height: int) -> None:
        if self.master >= 0:
            import fcntl
            import struct
            import termios

            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def close(self) -> None:
        close_fds(*set(self.child.values()), *(fd for _, _, fd in self._parent), self.master)
        self.child.clear()
        self._parent.clear()
        self.master = -1
        if self._console is not None:
            self._console.close()
            self._console = None
