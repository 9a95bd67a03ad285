"""Snapshots of what a test can leak, and a diff of two snapshots.

Only things that belong to this test session are looked at, because other sessions (other engineers'
test runs, a system containerd) may share the machine:
  * processes in our private mount namespace (containerd, shims, runc, logging binaries), plus
    container processes, recognised by a cgroup path under the session's cgroup prefix (containers
    have mount namespaces of their own);
  * podshim's zygotes (podshim/shim/zygote.py) live as long as their containerd: one that serves a
    live containerd, and its socket, belong to that containerd, not to a test. A zygote whose
    containerd is gone is a leak, and so is the socket of a zygote that is gone;
  * mounts under the containerd dir and under our private /run;
  * unix sockets (and podshim's shim lock files) under our private /run/containerd and
    /run/podshim/s, runc state dirs, and task bundles;
  * cgroup dirs under /sys/fs/cgroup/<hierarchy>/<prefix>*.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .containerd import mounts_under, umount_all_under

CGROUP_ROOT = Path("/sys/fs/cgroup")
ZYGOTE_MODULE = "podshim.shim.zygote"
RUN_CONTAINERD = Path("/run/containerd")
PODSHIM_SOCKETS = Path("/run/podshim/s")  # a shim's socket when the state dir's path is too long
SHIM_LOCK_SUFFIX = ".lock"


@dataclass(frozen=True, order=True)
class Proc:
    pid: int
    start: int  # starttime from /proc/<pid>/stat: (pid, start) survives pid reuse
    kind: str = field(compare=False)
    cmdline: str = field(compare=False)

    def __str__(self) -> str:
        return f"{self.kind} pid={self.pid}: {self.cmdline}"


@dataclass(frozen=True)
class Snapshot:
    processes: frozenset[Proc] = frozenset()
    mounts: frozenset[str] = frozenset()
    sockets: frozenset[str] = frozenset()
    runc_state: frozenset[str] = frozenset()
    bundles: frozenset[str] = frozenset()
    cgroups: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return any((self.processes, self.mounts, self.sockets, self.runc_state, self.bundles, self.cgroups))

    def minus(self, other: Snapshot) -> Snapshot:
        return Snapshot(
            processes=self.processes - other.processes,
            mounts=self.mounts - other.mounts,
            sockets=self.sockets - other.sockets,
            runc_state=self.runc_state - other.runc_state,
            bundles=self.bundles - other.bundles,
            cgroups=self.cgroups - other.cgroups,
        )

    def describe(self) -> str:
        lines: list[str] = []
        for name in ("processes", "mounts", "sockets", "runc_state", "bundles", "cgroups"):
            items: frozenset[object] = getattr(self, name)
            if items:
                lines.append(f"{name}:")
                lines.extend(f"  {x}" for x in sorted(items, key=str))
        return "\n".join(lines) or "(nothing)"


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _mnt_ns(pid: int | str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return ""


def _stat_fields(pid: int) -> tuple[str, int] | None:
    """(state, starttime) from /proc/<pid>/stat; None if the process is gone."""
    raw = _read(f"/proc/{pid}/stat")
    if not raw:
        return None
    # comm may contain spaces and parentheses; the fields after the last ")" are fixed.
    rest = raw[raw.rfind(")") + 2 :].split()
    return rest[0], int(rest[19])


def session_processes(cgroup_prefix: str, ignore_pids: Iterable[int] = ()) -> frozenset[Proc]:
    own_ns = _mnt_ns("self")
    ignored = {os.getpid(), *ignore_pids}
    found: set[Proc] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in ignored:
            continue
        st = _stat_fields(pid)
        # Zombies are not leaks: the shims' servers are reparented to init, which reaps them when it likes.
        if st is None or st[0] in ("Z", "X"):
            continue
        cmdline = _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()
        if not cmdline:
            continue  # kernel thread, or exiting
        in_cgroup = any(
            line.split(":", 2)[-1].startswith("/" + cgroup_prefix)
            for line in _read(f"/proc/{pid}/cgroup").splitlines()
        )
        if in_cgroup:
            kind = "container"
        elif own_ns and _mnt_ns(pid) == own_ns:
            exe = os.path.basename(cmdline.split(" ", 1)[0])
            kind = "process"
            if exe.startswith("containerd-shim"):
                kind = "shim"
            elif ZYGOTE_MODULE in cmdline:
                kind = "zygote"
            elif exe.startswith("runc"):
                kind = "runc"
        else:
            continue
        found.add(Proc(pid, st[1], kind, cmdline[:300]))
    return frozenset(found)


def zygote_argv(proc: Proc) -> tuple[str, int, int] | None:
    """(socket path, containerd pid, containerd start time) from a zygote's command line:
    `python -P -m podshim.shim.zygote <socket> <pid>:<starttime> <script> <idle>`."""
    args = proc.cmdline.split(" ")
    if ZYGOTE_MODULE not in args:
        return None
    i = args.index(ZYGOTE_MODULE)
    try:
        pid, _, start = args[i + 2].partition(":")
        return args[i + 1], int(pid), int(start)
    except (IndexError, ValueError):
        return None


def serving_zygotes(processes: Iterable[Proc]) -> dict[Proc, str]:
    """The zygotes whose containerd still runs, with their socket paths."""
    out: dict[Proc, str] = {}
    for proc in processes:
        args = zygote_argv(proc) if proc.kind == "zygote" else None
        if args is not None:
            st = _stat_fields(args[1])
            if st is not None and st[1] == args[2] and st[0] not in ("Z", "X"):
                out[proc] = args[0]
    return out


def _sockets_under(root: Path) -> set[str]:
    """Unix sockets, and the lifetime lock files podshim keeps beside its shims' sockets."""
    out: set[str] = set()
    if not root.is_dir():
        return out
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with contextlib.suppress(OSError):
                shim_lock = f.endswith(SHIM_LOCK_SUFFIX) and os.path.basename(dirpath) == "s"
                if shim_lock or stat.S_ISSOCK(os.lstat(p).st_mode):
                    out.add(p)
    return out


def _children(d: Path, depth: int) -> set[str]:
    """Paths exactly `depth` levels below d."""
    level = [d]
    for _ in range(depth):
        nxt: list[Path] = []
        for p in level:
            with contextlib.suppress(OSError):
                nxt.extend(c for c in p.iterdir() if c.is_dir())
        level = nxt
    return {str(p) for p in level}


def _cgroup_trees(match: Callable[[str], bool], depth: int | None = None) -> frozenset[str]:
    """Dirs /sys/fs/cgroup/<hierarchy>/<top> with match(top), and their subdirs down to `depth` levels."""
    out: set[str] = set()
    with contextlib.suppress(OSError):
        for hier in CGROUP_ROOT.iterdir():
            with contextlib.suppress(OSError):
                for top in hier.iterdir():
                    if match(top.name) and top.is_dir():
                        for dirpath, dirs, _files in os.walk(top):
                            out.add(dirpath)
                            if depth is not None and dirpath.count("/") - str(top).count("/") >= depth:
                                dirs.clear()
    return frozenset(out)


def session_cgroups(cgroup_prefix: str) -> frozenset[str]:
    """Every cgroup dir under /sys/fs/cgroup/<hierarchy>/<prefix>* (the top dirs included)."""
    return _cgroup_trees(lambda name: name.startswith(cgroup_prefix))


def namespace_cgroups(namespace: str, depth: int | None = None) -> frozenset[str]:
    """/sys/fs/cgroup/<hierarchy>/<namespace> (and below, down to `depth`): ctr's default cgroup parent."""
    return _cgroup_trees(lambda name: name == namespace, depth)


def take(*, base: Path, state: Path, cgroup_prefix: str, ignore_pids: Iterable[int] = ()) -> Snapshot:
    """Snapshot everything this session could leak. `base` is the containerd dir, `state` its state dir."""
    mounts = set(mounts_under(base))
    if RUN_CONTAINERD.exists():
        mounts.update(mounts_under(RUN_CONTAINERD))
    processes = session_processes(cgroup_prefix, ignore_pids)
    zygotes = serving_zygotes(processes)
    return Snapshot(
        processes=processes - zygotes.keys(),
        mounts=frozenset(mounts),
        sockets=frozenset(
            (_sockets_under(RUN_CONTAINERD) | _sockets_under(base) | _sockets_under(PODSHIM_SOCKETS))
            - set(zygotes.values())
        ),
        runc_state=frozenset(_children(RUN_CONTAINERD / "runc", 2)),
        bundles=frozenset(_children(state / "io.containerd.runtime.v2.task", 2)),
        cgroups=session_cgroups(cgroup_prefix),
    )


def wait_for_no_new(
    before: Snapshot, take_after: Callable[[], Snapshot], timeout: float = 5.0, interval: float = 0.1
) -> Snapshot:
    """Poll until nothing is left that `before` did not have; return what is left (empty = clean).

    Polling because shims exit, and remove their sockets, only after replying to Shutdown.
    """
    deadline = time.monotonic() + timeout
    while True:
        leaked = take_after().minus(before)
        if not leaked or time.monotonic() >= deadline:
            return leaked
        time.sleep(interval)


def remove_empty_cgroups(paths: Iterable[str]) -> list[str]:
    """rmdir the given cgroup dirs, deepest first; the ones still in use stay. Returns the removed ones."""
    removed: list[str] = []
    for p in sorted(paths, key=lambda s: s.count("/"), reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(p)
            removed.append(p)
    return removed


def reclaim(leaked: Snapshot) -> None:
    """Undo a leak so later tests start clean: SIGKILL the leaked processes (all of them were started
    by this session's tests), unmount leaked mounts, remove leaked cgroups."""
    for proc in leaked.processes:
        st = _stat_fields(proc.pid)
        if st is not None and st[1] == proc.start:  # still the same process, not a reused pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
        (st := _stat_fields(p.pid)) is not None and st[1] == p.start and st[0] not in ("Z", "X")
        for p in leaked.processes
    ):
        time.sleep(0.05)
    for m in sorted(leaked.mounts, key=lambda s: s.count("/"), reverse=True):
        umount_all_under(Path(m))
    remove_empty_cgroups(leaked.cgroups)


def qemu_pids() -> list[int]:
    """qemu processes of this test session (the same mount namespace as ours)."""
    own = os.readlink("/proc/self/ns/mnt")
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            exe = os.readlink(f"/proc/{entry}/exe")
            ns = os.readlink(f"/proc/{entry}/ns/mnt")
        except OSError:
            continue
        if os.path.basename(exe).startswith("qemu-system") and ns == own:
            pids.append(int(entry))
    return pids
