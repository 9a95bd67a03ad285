"""runc in the guest: ``runc --root /run/runc``, run through the agent's reaper."""

from __future__ import annotations

import contextlib
import json
import os

from podshim.guest.errors import AgentError
from podshim.guest.paths import RUNC, RUNC_ROOT, STATE
from podshim.guest.reaper import run


class RuncError(AgentError):
    pass


def runc(cid: str, *args: str, fds: dict[int, int] | None = None, capture: bool = False) -> bytes:
    logfile = os.path.join(STATE, f"{cid}.runc.log")
    argv = [RUNC, "--root", RUNC_ROOT, "--log", logfile, "--log-format", "json", *args]
    status, out = run(argv, fds, capture)
    if status != 0:
        raise RuncError(f"runc {args[0]} failed: {_last_runc_error(logfile) or f'exit status {status}'}")
    return out


def _last_runc_error(path: str) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        with contextlib.suppress(ValueError, AttributeError):
            entry = json.loads(line)
            if entry.get("level") == "error":
                return str(entry.get("msg", ""))
    return ""
