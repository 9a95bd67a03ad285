"""runc in the guest: :mod:`podshim.system.runc_command` with ``--root /run/runc``, run
through the agent's reaper."""

from __future__ import annotations

import os

from podshim.guest.errors import AgentError
from podshim.guest.paths import RUNC, RUNC_ROOT, STATE
from podshim.guest.reaper import run
from podshim.system.runc_command import RuncCommand


class RuncError(AgentError):
    pass


def command(cid: str) -> RuncCommand:
    return RuncCommand(RUNC, RUNC_ROOT, os.path.join(STATE, f"{cid}.runc.log"))


def runc(cid: str, *args: str, fds: dict[int, int] | None = None, capture: bool = False) -> bytes:
    cmd = command(cid)
    status, out = run(cmd.argv(*args), fds, capture)
    if status != 0:
        raise RuncError(cmd.error_message(args[0], status))
    return out
