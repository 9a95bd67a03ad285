"""``podshim exec``'s stdio: a unix socket the shim connects to, once per stream.

Each connection starts with one byte naming its stream (0 stdin, 1 stdout, 2 stderr); only the
shim's own process may connect (``SO_PEERCRED``).  The Exec call's reply carries the exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
import sys
import tempfile
import termios
import threading
import tty

from podshim.api import diag_pb2 as D
from podshim.cli.diag import call
from podshim.cli.discovery import ShimProcess

OUTPUT_DRAIN_TIMEOUT = 5.0
_UCRED = struct.Struct("iII")


def _peer_pid(conn: socket.socket) -> int:
    pid, _, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(pid)


async def _copy_out(conn: socket.socket, fd: int) -> None:
    loop = asyncio.get_running_loop()
    while data := await loop.sock_recv(conn, 65536):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


def _feed_stdin(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    """A daemon thread: stdin may be a file, which epoll cannot watch, or a terminal that never
    ends; the process exits without waiting for this thread."""

    def run() -> None:
        try:
            while data := os.read(0, 65536):
                conn.setblocking(True)
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threading.Thread(target=run, name="stdin", daemon=True).start()


async def run_exec(shim: ShimProcess, args: list[str], use_tty: bool, env: list[str]) -> D.ExecResponse:
    loop = asyncio.get_running_loop()
    # A path, not an abstract name: the shim may be in another network namespace (a host pod's
    # shim is in containerd's); through /proc/<our pid>/root it resolves in any mount namespace.
    private = tempfile.mkdtemp(prefix="podshim-exec-")
    path = os.path.join(private, "stdio.sock")
    name = f"/proc/{os.getpid()}/root{path}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(path)
    listener.listen(4)
    listener.setblocking(False)
    expected = (0, 1) if use_tty else (0, 1, 2)
    conns: dict[int, socket.socket] = {}
    outputs: list[asyncio.Task[None]] = []

    async def accept() -> None:
        while len(conns) < len(expected):
            conn, _ = await loop.sock_accept(listener)
            if _peer_pid(conn) != shim.pid:
                conn.close()  # not our shim: someone else found the name
                continue
            head = await loop.sock_recv(conn, 1)
            if not head or head[0] not in expected or head[0] in conns:
                conn.close()
                continue
            stream = head[0]
            conns[stream] = conn
            if stream == 0:
                _feed_stdin(loop, conn)
            else:
                outputs.append(loop.create_task(_copy_out(conn, stream)))

    width = height = 0
    saved = None
    if use_tty and sys.stdin.isatty():
        width, height = os.get_terminal_size(0)
        saved = termios.tcgetattr(0)
        tty.setraw(0)
    accepting = loop.create_task(accept())
    try:
        req = D.ExecRequest(args=args, env=env, tty=use_tty, stdio_socket=name, width=width, height=height)
        resp = await call(shim, "Exec", req, D.ExecResponse, timeout=None)
        if outputs:
            await asyncio.wait(outputs, timeout=OUTPUT_DRAIN_TIMEOUT)
        return resp
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        accepting.cancel()
        for t in outputs:
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await accepting
        for c in conns.values():
            c.close()
        listener.close()
        shutil.rmtree(private, ignore_errors=True)
