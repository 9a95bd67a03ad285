"""File descriptor helpers."""

from __future__ import annotations

import contextlib
import os


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None and fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
