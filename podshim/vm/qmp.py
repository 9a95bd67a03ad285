"""A minimal QMP client: qemu's JSON control socket, for saving templates and restoring clones.

One command in flight at a time, which is all the template code needs; asynchronous events
(lines with an ``"event"`` key) are skipped.  A plain non-blocking socket rather than asyncio's
streams, because ``getfd`` hands qemu a descriptor in the same message (SCM_RIGHTS): qemu's
sandbox (spawn=deny) rules out an ``exec:`` migration, and its outgoing ``fd:`` migration takes
only a descriptor it was given by name.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import socket
from typing import Any

MAX_LINE = 1 << 20


class QMPError(Exception):
    """qemu refused a command, or its control socket went away."""


class QMP:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""

    @classmethod
    async def connect(cls, path: str, timeout: float) -> QMP:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, path)
                break
            except (ConnectionRefusedError, FileNotFoundError) as e:
                sock.close()
                if loop.time() > deadline:
                    raise QMPError(f"no QMP socket at {path}: {e}") from e
                await asyncio.sleep(0.005)
        qmp = cls(sock)
        try:
            greeting = await asyncio.wait_for(qmp._message(), max(0.1, deadline - loop.time()))
            if "QMP" not in greeting:
                raise QMPError(f"not a QMP greeting: {greeting}")
            await qmp.execute("qmp_capabilities")
        except BaseException:
            qmp.close()
            raise
        return qmp

    async def _message(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise QMPError("QMP sent a line longer than 1 MiB")
            data = await loop.sock_recv(self._sock, 65536)
            if not data:
                raise QMPError("qemu closed its QMP socket")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise QMPError(f"QMP sent something that is not JSON: {line[:200]!r}") from e
        if not isinstance(msg, dict):
            raise QMPError(f"QMP sent a non-object: {line[:200]!r}")
        return msg

    async def execute(self, command: str, fd: int = -1, **arguments: Any) -> Any:
        """Run ``command``; with ``fd``, pass that descriptor along (for ``getfd``)."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        if fd >= 0:
            # One small message on a socket with nothing queued: sent whole, or not at all.
            fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
            if self._sock.sendmsg([data], fds) != len(data):
                raise QMPError(f"{command}: short write on the QMP socket")
        else:
            await asyncio.get_running_loop().sock_sendall(self._sock, data)
        while True:
            reply = await self._message()
            if "event" in reply:
                continue
            if "error" in reply:
                err = reply["error"]
                raise QMPError(f"{command}: {err.get('desc') or err}")
            return reply.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
