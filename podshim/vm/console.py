"""The guest's serial console (qemu's stdout and stderr), kept on the host within a bound.

The guest writes its console as fast as it likes, and guest root may be hostile: written straight
to a file, it could fill the host's ``/run``.  So qemu writes into a pipe, and the shim copies it
to ``console.log``; past :data:`LIMIT` bytes the file is rotated to ``console.log.1``, so at most
twice the limit is kept and the newest output (a panic, qemu's last words) is always there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from podshim.system.stdio import readable

LIMIT = 1 << 20


class ConsoleLog:
    def __init__(self, read_fd: int, path: str, limit: int = LIMIT) -> None:
        self.fd = read_fd
        self.path = path
        self.limit = limit
        os.set_blocking(read_fd, False)
        self._out = self._open()
        self.task = asyncio.get_running_loop().create_task(self._run())

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def _write(self, data: bytes) -> None:
        if os.fstat(self._out).st_size + len(data) > self.limit:
            os.close(self._out)
            os.replace(self.path, self.path + ".1")
            self._out = self._open()
        view = memoryview(data)[-self.limit :]
        while view:
            view = view[os.write(self._out, view) :]

    def pump(self) -> bool:
        """Copy what the pipe holds now; False at EOF (qemu and its children are gone)."""
        while self.fd >= 0:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return True
            if not data:
                return False
            self._write(data)
        return False

    async def _run(self) -> None:
        try:
            while self.pump():
                await readable(self.fd)
        except OSError:
            pass
        finally:
            self.close()

    def close(self) -> None:
        for fd in (self.fd, self._out):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self._out = -1
