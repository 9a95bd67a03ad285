"""Finding every podshim on the node, for every containerd and namespace, with no flags.

A shim server is a process whose argv names ``containerd-shim-podshim-v1…`` (with any action but
``delete``: a server forked by ``start`` keeps its argv) and which leads its own session (the
server ``setsid``s; the ``start`` action itself does not).  Its working directory is the bundle
it started in, whose ``address`` file holds its socket, so a containerd with any root and state
is found the same way.  The
socket is reached through ``/proc/<pid>/root``, so a shim in another mount namespace (a test's
private containerd) answers too.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from podshim.shim import address
from podshim.shim.main import UsageError, parse_args

SHIM_BINARY = "containerd-shim-podshim-v1"
MAX_SUN_PATH = 107


@dataclass(frozen=True)
class ShimProcess:
    pid: int
    namespace: str
    containerd_address: str
    id: str  # the -id it was started with: the pod's (or standalone container's) id
    bundle: str
    socket: str  # as the shim sees it

    def connect_path(self) -> str:
        """A path to the socket that works from this process's mount namespace."""
        return via_proc_root(self.pid, self.socket)


def via_proc_root(pid: int, path: str) -> str:
    full = f"/proc/{pid}/root{path}"
    if len(full) <= MAX_SUN_PATH:
        return full
    # Too long for sun_path: name the directory by an O_PATH descriptor instead (kept open for the
    # life of the CLI process, which is short).
    fd = os.open(os.path.dirname(full), os.O_PATH | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{os.path.basename(full)}"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def shim_process(pid: int) -> ShimProcess | None:
    try:
        argv = [a.decode(errors="replace") for a in _read(f"/proc/{pid}/cmdline").split(b"\0") if a]
        if os.getsid(pid) != pid:
            return None
        start = next(i for i, a in enumerate(argv) if os.path.basename(a).startswith(SHIM_BINARY))
        args = parse_args(argv[start + 1 :])
        if args.action == "delete" or not (args.namespace and args.id and args.address):
            return None  # a delete action, or something else that is no server containerd started
        bundle = os.readlink(f"/proc/{pid}/cwd").removesuffix(" (deleted)")
    except (OSError, StopIteration, UsageError, ProcessLookupError):
        return None
    try:
        socket = _read(f"/proc/{pid}/cwd/address").decode().strip().removeprefix("unix://")
    except OSError:
        # Its first bundle is gone (deleted before the pod's other containers): the path rule.
        socket = address.socket_path(args.address, args.namespace, args.id, bundle)
    socket = args.socket or socket
    return ShimProcess(pid, args.namespace, args.address, args.id, bundle, socket)


def find_shims() -> list[ShimProcess]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                shim = shim_process(int(name))
                if shim is not None:
                    found.append(shim)
    return sorted(found, key=lambda s: (s.containerd_address, s.namespace, s.id))
