"""A minimal QMP client: qemu's JSON control socket, for saving templates and restoring clones.

One command in flight at a time, which is all the template code needs; asynchronous events
(lines with an ``"event"`` key) are skipped.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any


class QMPError(Exception):
    """qemu refused a command, or its control socket went away."""


class QMP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, path: str, timeout: float) -> QMP:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
                break
            except (ConnectionRefusedError, FileNotFoundError) as e:
                if loop.time() > deadline:
                    raise QMPError(f"no QMP socket at {path}: {e}") from e
                await asyncio.sleep(0.005)
        qmp = cls(reader, writer)
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
        line = await self._reader.readline()
        if not line:
            raise QMPError("qemu closed its QMP socket")
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise QMPError(f"QMP sent something that is not JSON: {line[:200]!r}") from e
        if not isinstance(msg, dict):
            raise QMPError(f"QMP sent a non-object: {line[:200]!r}")
        return msg

    async def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._writer.write(json.dumps(msg).encode() + b"\n")
        await self._writer.drain()
        while True:
            reply = await self._message()
            if "event" in reply:
                continue
            if "error" in reply:
                err = reply["error"]
                raise QMPError(f"{command}: {err.get('desc') or err}")
            return reply.get("return")

    def close(self) -> None:
        self._writer.close()
