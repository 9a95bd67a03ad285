"""File and descriptor helpers, shared by the shim and the guest agent (standard library only)."""

from __future__ import annotations

import contextlib
import os


def close_fds(*fds: int | None) -> None:
    """Close each fd that is set (not None, not negative), ignoring errors: for cleanup paths."""
    for fd in fds:
        if fd is not None and fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def read_text(path: str) -> str:
    """A small file's text; "" when it cannot be read (a cgroup file gone, a missing /proc entry)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
