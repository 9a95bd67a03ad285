"""System calls the agent needs and Python 3.11's ``os`` lacks, through ``ctypes``: mount(2),
unshare(2) and prctl(2).  Loaded when the agent starts (before any fork, and before a template
is saved), so that calling them later reads no file."""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

PR_SET_NAME = 15
PR_SET_NO_NEW_PRIVS = 38


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    result = _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode())
    _check(result, f"mount {target}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def prctl(option: int, arg: int | bytes) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl({option})")
