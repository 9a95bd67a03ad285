"""The pod's sandbox in a VM, held without a pause container.

In a process pod the sandbox (pause) container exists to hold the namespaces that the pod's
containers join.  In a VM pod the VM already is the sandbox, and creating a pause container
with the OCI runtime is most of what a pod's start costs under TCG (a runtime create and start,
rootfs over 9p, some 0.45 s).  So the agent holds the namespaces itself: a process forked from
the agent unshares the sandbox's IPC, UTS and PID namespaces, applies its sysctls, hostname and
OOM score, and then, as PID 1 of the pod's PID namespace, reaps orphans and waits for a signal,
which is what pause does.  The workloads' specs name ``/proc/<its pid>/ns/*`` as they would name
pause's, so nothing changes for them.

It gives up everything before it waits: it chroots into an empty read-only directory, drops to
the sandbox's user (never root: 65535, pause's, when the spec says root), sets no_new_privs, and
keeps no descriptor, so a container sharing its PID namespace finds less in it than in pause.
It lives in its own cgroup under the sandbox's cgroups path, for stats, pause and kill.

Standard library only (:mod:`.libc` for ``unshare(2)`` and ``prctl(2)``); loaded by the agent
before any fork, so that the forked child imports nothing.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
from dataclasses import dataclass
from typing import Any

from podshim.guest import libc
from podshim.guest.errors import InvalidArgument

# <linux/sched.h>
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
NAMESPACE_FLAGS = {"ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS, "pid": CLONE_NEWPID}
EMPTY_ROOT = "/run/podshim/holder-root"
NOBODY = 65535  # pause's user
NAME = b"pod-sandbox"
SYSCTL_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
WAITED = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class HoldSpec:
    namespaces: tuple[str, ...]
    hostname: str
    sysctl: tuple[tuple[str, str], ...]
    uid: int
    gid: int
    oom_score_adj: int | None

    @property
    def unshare_flags(self) -> int:
        flags = 0
        for ns in self.namespaces:
            flags |= NAMESPACE_FLAGS[ns]
        return flags


def _int(value: Any, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidArgument(f"hold: {what} must be an integer in [{low}, {high}], not {value!r}")
    return value


def parse(req: dict[str, Any]) -> HoldSpec:
    """The ``hold`` request's arguments, checked (the host builds them from the sandbox's spec)."""
    namespaces = req.get("namespaces") or []
    if not isinstance(namespaces, list) or any(ns not in NAMESPACE_FLAGS for ns in namespaces):
        raise InvalidArgument(f"hold: namespaces must be among {sorted(NAMESPACE_FLAGS)}, not {namespaces!r}")
    hostname = req.get("hostname") or ""
    if not isinstance(hostname, str) or len(hostname.encode()) > 64:
        raise InvalidArgument("hold: hostname must be a string of at most 64 bytes")
    raw = req.get("sysctl") or {}
    if not isinstance(raw, dict):
        raise InvalidArgument("hold: sysctl must be an object")
    sysctl = []
    for key, value in sorted(raw.items()):
        if not isinstance(key, str) or not SYSCTL_KEY.match(key) or ".." in key or not isinstance(value, str):
            raise InvalidArgument(f"hold: bad sysctl {key!r}")
        sysctl.append((key, value))
    uid = _int(req.get("uid", 0), "uid", 0, 2**32 - 2)
    gid = _int(req.get("gid", 0), "gid", 0, 2**32 - 2)
    adj = req.get("oom_score_adj")
    return HoldSpec(
        namespaces=tuple(dict.fromkeys(namespaces)),
        hostname=hostname,
        sysctl=tuple(sysctl),
        uid=uid or NOBODY,
        gid=gid if uid else NOBODY,
        oom_score_adj=None if adj is None else _int(adj, "oom_score_adj", -1000, 1000),
    )


def prepare() -> None:
    """The holder's root: an empty directory nobody can write to."""
    os.makedirs(EMPTY_ROOT, mode=0o555, exist_ok=True)
    os.chmod(EMPTY_ROOT, 0o555)


def fork(spec: HoldSpec, report: int) -> int:
    """Fork the holder's parent (in the agent; returns its pid).  It unshares the namespaces and
    forks the holder, the PID namespace's first process, writes ``pid <n>`` to ``report`` and
    exits; the holder writes ``ok`` or ``error <why>`` there once it is set up, then closes it.
    The caller reaps the parent and claims the holder (an orphan the agent, PID 1, inherits)."""
    pid = os.fork()
    if pid:
        return pid
    # The forked child of a threaded process: only system calls from here on, no imports, no
    # locks, and never back into the agent's code.
    status = 1
    try:
        libc.unshare(spec.unshare_flags)
        holder = os.fork()
        if holder == 0:
            _hold(spec, report)
        _say(report, f"pid {holder}")
        status = 0
    except OSError as e:
        _say(report, f"error {e}")
    finally:
        os._exit(status)


def _say(fd: int, line: str) -> None:
    os.write(fd, (line + "\n").encode())


def _hold(spec: HoldSpec, report: int) -> None:
    try:
        _set_up(spec, report)
    except BaseException as e:  # reported, and this process ends either way
        try:
            _say(report, f"error {type(e).__name__}: {e}")
        finally:
            os._exit(1)
    os.close(report)
    try:
        _wait()
    finally:
        os._exit(0)


def _set_up(spec: HoldSpec, report: int) -> None:
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    keep = sorted({0, 1, 2, report})
    for lo, hi in zip(keep, [*keep[1:], 1 << 20], strict=True):
        os.closerange(lo + 1, hi)
    for key, value in spec.sysctl:
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)
    if spec.hostname and "uts" in spec.namespaces:
        socket.sethostname(spec.hostname)
    if spec.oom_score_adj is not None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(spec.oom_score_adj))
    os.chroot(EMPTY_ROOT)
    os.chdir("/")
    os.setgroups([])
    os.setresgid(spec.gid, spec.gid, spec.gid)
    os.setresuid(spec.uid, spec.uid, spec.uid)  # not root: every capability goes
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    libc.prctl(libc.PR_SET_NAME, NAME)
    # The first process of a PID namespace gets only the signals it has a handler for; blocked
    # and waited for, the handler itself never runs.
    for sig in WAITED:
        signal.signal(sig, _ignore)
    signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)
    _say(report, "ok")


def _ignore(signum: int, frame: object) -> None:
    pass


def _wait() -> None:
    """pause's loop: reap whatever ends in the namespace; SIGTERM or SIGINT ends the pod."""
    while True:
        info = signal.sigwaitinfo(WAITED)
        if info.si_signo != signal.SIGCHLD:
            return
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            except OSError as e:
                if e.errno != errno.EINTR:
                    break
                continue
            if pid == 0:
                break


def read_report(fd: int) -> tuple[int, str]:
    """What the holder's parent and the holder wrote: its pid (0 if none) and the error, if any."""
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    pid, error = 0, ""
    for line in b"".join(chunks).decode(errors="replace").splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "pid" and rest.isdigit():
            pid = int(rest)
        elif kind == "error":
            error = error or rest
    if not pid and not error:
        error = "the holder's parent died before it forked"
    return pid, error
