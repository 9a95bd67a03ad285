"""runc in the guest: :mod:`podshim.system.runc_command` with ``--root /run/runc``, run
through the agent's reaper.

The runtime runs from a sealed in-memory copy (:func:`seal_runtime`).  runc and crun defend
against CVE-2019-5736 (a container overwriting the runtime through ``/proc/self/exe``) by
copying or bind-mounting themselves and re-executing at every start, unless the binary is
already a memfd sealed against writes.  The guest's ``/usr`` is a tmpfs, which counts as
unsealed, so each call of crun executed three times over; under TCG that tripled the cost of
every create, start, kill and delete (0.09-0.16 s per call against 0.03 s).  One sealed copy,
made once by the agent and held for its life, gives the same protection: nobody can write to it.
"""

from __future__ import annotations

import fcntl
import os

from podshim.guest.errors import AgentError
from podshim.guest.log import log
from podshim.guest.paths import RUNC, RUNC_ROOT, STATE
from podshim.guest.reaper import run
from podshim.system.runc_command import RuncCommand

# What runc's and crun's self-check looks for (their cloned_binary.c): every one of these seals.
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE

_runtime = RUNC


class RuncError(AgentError):
    pass


def sealed_copy(path: str) -> int:
    """A memfd holding the file at ``path``, sealed against any change; the caller keeps it."""
    fd = os.memfd_create(os.path.basename(path), os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        with open(path, "rb") as src:
            while chunk := src.read(1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def seal_runtime() -> None:
    """Run the runtime from now on from a sealed copy held by this process (path through
    ``/proc/<agent>/fd``, which a spawned child resolves without inheriting the fd); on any
    failure the binary itself, as before."""
    global _runtime
    try:
        fd = sealed_copy(RUNC)
    except OSError as e:
        log(f"running {RUNC} unsealed (it re-executes itself at every call): {e}")
        return
    _runtime = f"/proc/{os.getpid()}/fd/{fd}"


def start(cid: str) -> None:
    """Start a created container.  For crun this is what ``crun start`` does, done here: open the
    container's ``exec.fifo`` for writing, unlink it (which makes the state "running") and write
    one byte, on which the container's init, blocked reading it since create, goes on to exec
    the process.  Under TCG that spares a crun process (0.1-0.2 s on a clone's cold translation
    cache).  runc's fifo works the other way round, so runc (and a fifo not where crun keeps it)
    get the command."""
    if not RUNC.endswith("/crun"):
        runc(cid, "start", cid)
        return
    fifo = os.path.join(RUNC_ROOT, cid, "exec.fifo")
    try:
        # Non-blocking: with the init gone nobody holds the read end, and open would wait forever.
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        runc(cid, "start", cid)
        return
    except OSError as e:
        raise RuncError(f"OCI runtime start failed: the container's init is gone ({e.strerror})") from e
    try:
        os.unlink(fifo)
        os.write(fd, b"\0")
    except OSError as e:
        raise RuncError(f"OCI runtime start failed: {e}") from e
    finally:
        os.close(fd)


def command(cid: str) -> RuncCommand:
    return RuncCommand(_runtime, RUNC_ROOT, os.path.join(STATE, f"{cid}.runc.log"))


def runc(cid: str, *args: str, fds: dict[int, int] | None = None, capture: bool = False) -> bytes:
    cmd = command(cid)
    status, out = run(cmd.argv(*args), fds, capture)
    if status != 0:
        raise RuncError(cmd.error_message(args[0], status))
    return out
