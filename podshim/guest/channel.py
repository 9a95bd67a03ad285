"""The agent's end of the virtio-serial port the shim connects to."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from podshim.guest import protocol as P

PORT_NAME = "podshim.agent"


def find_port(name: str = PORT_NAME) -> str:
    base = "/sys/class/virtio-ports"
    for port in sorted(os.listdir(base) if os.path.isdir(base) else []):
        with contextlib.suppress(OSError), open(os.path.join(base, port, "name")) as f:
            if f.read().strip() == name:
                return os.path.join("/dev", port)
    raise SystemExit(f"no virtio-serial port named {name}")


class Channel:
    """Whole-frame writes under one lock, so frames from many threads never interleave."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._wlock = threading.Lock()

    def send(self, frame: bytes) -> None:
        view = memoryview(frame)
        with self._wlock:
            while view:
                try:
                    n = os.write(self.fd, view)
                except InterruptedError:
                    continue
                view = view[n:]

    def send_json(self, ftype: int, stream: int, obj: dict[str, Any]) -> None:
        self.send(P.encode_json(ftype, stream, obj))
