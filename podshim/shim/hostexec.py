"""Diag.Exec for process and host pods: a command in the shim's own namespaces, a child of its
one reaper, with its stdio on the client's connections (or a pty copied to them)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket

from podshim import errdefs
from podshim.system import reaper
from podshim.system.stdio import copy

EXEC_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STDIN, STDOUT, STDERR = 0, 1, 2


async def host_exec(
    argv: list[str], env: dict[str, str], tty: bool, conns: dict[int, socket.socket], width: int, height: int
) -> int:
    """A command in the shim's own namespaces, a child of the shim's reaper."""
    env = {"PATH": EXEC_PATH, **env}
    exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env["PATH"])
    if exe is None or not os.access(exe, os.X_OK):
        raise errdefs.NotFound(f"{argv[0]}: no such executable (PATH={env['PATH']})")
    if not tty:
        for s in conns.values():
            s.setblocking(True)  # the flag is the socket's, shared with the child
        fds = {stream: s.fileno() for stream, s in conns.items()}
        _, exited = reaper.spawn_with_fds([exe, *argv[1:]], fds, env)
        for s in conns.values():
            s.close()  # the child has them now; its exit is our peer's EOF
        return (await exited).status
    master, slave = os.openpty()
    try:
        if width and height:
            import fcntl
            import struct
            import termios

            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
        _, exited = reaper.spawn_with_fds(
            [exe, *argv[1:]], {0: slave, 1: slave, 2: slave}, {"TERM": "xterm", **env}
        )
        os.close(slave)
        slave = -1
        copies = []
        if STDOUT in conns:
            copies.append(asyncio.ensure_future(copy(master, conns[STDOUT].fileno())))
        if STDIN in conns:
            copies.append(asyncio.ensure_future(copy(conns[STDIN].fileno(), master)))
        status = (await exited).status
        if copies:
            await asyncio.wait(copies[:1], timeout=5.0)  # the output, up to the pty's EIO
        for c in copies:
            c.cancel()
        return status
    finally:
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)
