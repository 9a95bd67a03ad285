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
import json
import os
import re
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from podshim.guest import libc
from podshim.guest.errors import AgentError, InvalidArgument
from podshim.guest.reaper import REAPER
from podshim.system.children import Exit

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


def _int(value: Any, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidArgument(f"hold: {what} must be an integer in [{low}, {high}], not {value!r}")
    return value


def parse(req: dict[str, Any]) -> HoldSpec:
    """The ``hold`` request's arguments, checked (the host builds them from the sandbox's spec).
    The holder always keeps all three namespaces; ``namespaces`` names those the sandbox asks
    for, and anything else in it (a user namespace) is refused rather than silently not held."""
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


def fork(orders: int, report: int) -> int:
    """Fork the holder's parent (in the agent; returns its pid).  It unshares the IPC, UTS and
    PID namespaces, forks the holder (the PID namespace's first process), writes ``pid <n>`` to
    ``report`` and exits.  The holder keeps only ``orders`` and ``report`` and waits: when the
    agent writes a hold request (JSON) to ``orders`` and closes it, the holder sets itself up,
    writes ``ok`` or ``error <why>`` to ``report``, and closes it.  The caller reaps the parent
    and claims the holder (an orphan the agent, PID 1, inherits).

    The agent forks one at its start, so a clone of a template finds it ready: forking a python
    under TCG is a tenth of a second.  All three namespaces are always the holder's own; a pod
    whose sandbox shares the VM's (hostIPC, hostPID, host network) has workloads that join none
    of them."""
    pid = os.fork()
    if pid:
        return pid
    # The forked child of a threaded process: only system calls from here on, no imports, no
    # locks, and never back into the agent's code.
    status = 1
    try:
        libc.unshare(CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID)
        holder = os.fork()
        if holder == 0:
            _hold(orders, report)
        _say(report, f"pid {holder}")
        status = 0
    except OSError as e:
        _say(report, f"error {e}")
    finally:
        os._exit(status)


def _say(fd: int, line: str) -> None:
    os.write(fd, (line + "\n").encode())


def _hold(orders: int, report: int) -> None:
    try:
        os.setsid()
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        keep = sorted({0, 1, 2, orders, report})
        for lo, hi in zip(keep, [*keep[1:], 1 << 20], strict=True):
            os.closerange(lo + 1, hi)
        chunks = []
        while chunk := os.read(orders, 65536):
            chunks.append(chunk)
        os.close(orders)
        if not chunks:
            os._exit(0)  # the agent let it go unused
        _set_up(parse(json.loads(b"".join(chunks))))
    except BaseException as e:  # reported, and this process ends either way
        try:
            _say(report, f"error {type(e).__name__}: {e}")
        finally:
            os._exit(1)
    _say(report, "ok")
    os.close(report)
    try:
        _wait()
    finally:
        os._exit(0)


def _set_up(spec: HoldSpec) -> None:
    for key, value in spec.sysctl:
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)
    if spec.hostname:
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


def order(spec: HoldSpec) -> bytes:
    """What the agent writes to a holder's ``orders``: the request :func:`parse` reads back."""
    return json.dumps(
        {
            "namespaces": list(spec.namespaces),
            "hostname": spec.hostname,
            "sysctl": dict(spec.sysctl),
            "uid": spec.uid,
            "gid": spec.gid,
            "oom_score_adj": spec.oom_score_adj,
        }
    ).encode()


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


def read_pid(fd: int) -> int:
    """The holder's pid, from the first line its parent writes to ``report`` (OSError if none)."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        line += chunk
    kind, _, rest = line.decode(errors="replace").strip().partition(" ")
    if kind != "pid" or not rest.isdigit():
        why = line.decode(errors="replace").strip() or "its parent died"
        raise OSError(errno.ECHILD, f"no holder: {why}")
    return int(rest)


def read_outcome(fd: int) -> str:
    """The holder's report once it had its orders: "" when it is set up, else why not."""
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    text = b"".join(chunks).decode(errors="replace").strip()
    if text == "ok":
        return ""
    return text.removeprefix("error ") or "the holder died before it was set up"


class Spare:
    """A holder forked ahead of its pod, waiting for its orders (:func:`fork`)."""

    def __init__(self, pid: int, orders: int, report: int) -> None:
        self.pid = pid
        self._orders = orders
        self._report = report
        self._lock = threading.Lock()
        self._exit: Exit | None = None
        self._on_exit: Callable[[Exit], None] | None = None

    @classmethod
    def start(cls) -> Spare:
        orders_r, orders_w = os.pipe()
        report_r, report_w = os.pipe()
        try:
            with REAPER.expecting():  # the holder is an orphan of ours: its exit may come first
                REAPER.track(lambda: fork(orders_r, report_w), _parent_exited)
                os.close(report_w)
                report_w = -1
                pid = read_pid(report_r)
                spare = cls(pid, orders_w, report_r)
                REAPER.claim(pid, spare._exited)
        except BaseException:
            for fd in (orders_w, report_r):
                os.close(fd)
            raise
        finally:
            os.close(orders_r)
            if report_w >= 0:
                os.close(report_w)
        return spare

    def _exited(self, ex: Exit) -> None:
        with self._lock:
            target = self._on_exit
            if target is None:
                self._exit = ex
                return
        target(ex)

    @property
    def alive(self) -> bool:
        with self._lock:
            return self._exit is None

    def hold(self, spec: HoldSpec, on_exit: Callable[[Exit], None]) -> None:
        """Give the holder its orders; from now on its exit goes to ``on_exit``.  AgentError if
        it could not set itself up (it is then gone, its exit delivered)."""
        with self._lock:
            early, self._on_exit = self._exit, on_exit
        if early is not None:
            on_exit(early)
        try:
            try:
                view = memoryview(order(spec))
                while view:
                    view = view[os.write(self._orders, view) :]
            except BrokenPipeError:
                pass  # it died: its report says so
            os.close(self._orders)
            self._orders = -1
            error = read_outcome(self._report)
        finally:
            self.close()
        if error:
            raise AgentError(f"cannot hold the sandbox's namespaces: {error}")

    def close(self) -> None:
        """Let it go (unused, it exits when its orders pipe closes with nothing in it)."""
        for fd in (self._orders, self._report):
            if fd >= 0:
                os.close(fd)
        self._orders = self._report = -1


def _parent_exited(ex: Exit) -> None:
    """The holder's parent exits as soon as it has forked the holder: nothing to report."""
