"""Cgroups, shared by the shim and the guest agent (standard library only): where a process's
cgroup is, its metrics as containerd's cgroups Metrics fields (spec §5.6), its OOM kills (spec
§5.5) as an fd to poll, so the shim's event loop and the agent's thread watch them alike, and
the few writes that make, join and freeze a cgroup of one's own (the shim's host-process
containers, the agent's sandbox holder).

On a hybrid host (cgroup v1 controllers beside an empty v2 tree, like this machine kind) the
v1 controllers are authoritative.  A pure v2 host (and the guest) has ``cgroup.controllers``
at the root.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from typing import Any, NamedTuple

from podshim.system.fds import read_text

CGROUP_ROOT = "/sys/fs/cgroup"


def unified_host() -> bool:
    return os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers"))


class Cgroup(NamedTuple):
    """Absolute cgroup directories of one process: per v1 controller, or one v2 directory."""

    v1: dict[str, str]
    v2: str | None

    @classmethod
    def of_pid(cls, pid: int) -> Cgroup | None:
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        v1: dict[str, str] = {}
        v2: str | None = None
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if not controllers:
                if unified_host():
                    v2 = os.path.join(CGROUP_ROOT, path.lstrip("/"))
                continue
            for c in controllers.split(","):
                c = c.removeprefix("name=")
                base = os.path.join(CGROUP_ROOT, c)
                if os.path.isdir(base):
                    v1[c] = os.path.join(base, path.lstrip("/"))
        return cls(v1, v2)

    @property
    def memory_dir(self) -> str | None:
        return self.v2 or self.v1.get("memory")

    def exists(self) -> bool:
        d = self.v2 or self.v1.get("memory") or self.v1.get("pids")
        return d is not None and os.path.isdir(d)

    def pids(self) -> list[int]:
        d = self.v2 or self.v1.get("pids") or self.v1.get("memory")
        if d is None:
            return []
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []


UNLIMITED = 2**64 - 1
"""What containerd's cgroups v2 reader reports for a v2 limit of "max"."""


# -- cgroups made by podshim itself ---------------------------------------------------------------

_V1_OWN = ("memory", "cpu", "cpuacct", "pids", "freezer", "blkio")


def cgroup_at(path: str) -> Cgroup:
    """The directories of cgroup ``path`` (cgroupfs form, e.g. ``/k8s.io/<id>``) on this host."""
    rel = path.strip("/")
    if unified_host():
        return Cgroup({}, os.path.join(CGROUP_ROOT, rel))
    v1 = {
        c: os.path.join(CGROUP_ROOT, c, rel) for c in _V1_OWN if os.path.isdir(os.path.join(CGROUP_ROOT, c))
    }
    return Cgroup(v1, None)


def dirs(cg: Cgroup) -> list[str]:
    return [cg.v2] if cg.v2 else list(cg.v1.values())


def write(path: str, value: object) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def create(cg: Cgroup, controllers: tuple[str, ...] = ()) -> None:
    """Make the cgroup's directories.  On v2, with ``controllers``: enable those the root offers
    in each parent's ``cgroup.subtree_control`` on the way down, as a runtime does for a
    container (what the kernel refuses, the cgroup goes without)."""
    if cg.v2 is None or not controllers:
        for d in dirs(cg):
            os.makedirs(d, exist_ok=True)
        return
    offered = read_text(os.path.join(CGROUP_ROOT, "cgroup.controllers")).split()
    enable = " ".join(f"+{c}" for c in controllers if c in offered)
    d = CGROUP_ROOT
    for part in os.path.relpath(cg.v2, CGROUP_ROOT).split("/"):
        with contextlib.suppress(OSError):
            write(os.path.join(d, "cgroup.subtree_control"), enable)
        d = os.path.join(d, part)
        with contextlib.suppress(FileExistsError):
            os.mkdir(d)


def join(cg: Cgroup, pid: int = 0) -> None:
    """Move pid (0: the caller) into every directory of the cgroup."""
    for d in dirs(cg):
        write(os.path.join(d, "cgroup.procs"), pid)


def freeze(cg: Cgroup, frozen: bool) -> None:
    if cg.v2:
        write(f"{cg.v2}/cgroup.freeze", 1 if frozen else 0)
    elif fd := cg.v1.get("freezer"):
        write(f"{fd}/freezer.state", "FROZEN" if frozen else "THAWED")
    else:
        raise OSError("no freezer cgroup: cannot pause")


def _int(path: str, unlimited: int = 0) -> int:
    """A counter or limit; "max" is ``unlimited``: 0 as containerd's v1 reader has it."""
    text = read_text(path).strip()
    if text == "max":
        return unlimited
    if not text:
        return 0
    try:
        return int(text.split()[0])
    except ValueError:
        return 0


def read_keyed(path: str) -> dict[str, int]:
    """A flat keyed file (``key value`` lines: cpu.stat, memory.stat, memory.events...)."""
    out: dict[str, int] = {}
    for line in read_text(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


_V1_MEMORY_STAT = [
    "cache", "rss", "rss_huge", "mapped_file", "dirty", "writeback", "pgpgin", "pgpgout", "pgfault",
    "pgmajfault", "inactive_anon", "active_anon", "inactive_file", "active_file", "unevictable",
    "hierarchical_memory_limit", "hierarchical_memsw_limit",
]  # fmt: skip
_V1_PROTO_NAMES = {
    "pgpgin": "pg_pg_in", "pgpgout": "pg_pg_out", "pgfault": "pg_fault", "pgmajfault": "pg_maj_fault",
    "hierarchical_memsw_limit": "hierarchical_swap_limit",
}  # fmt: skip


def v1_metrics(cg: Cgroup) -> dict[str, Any]:
    """io.containerd.cgroups.v1.Metrics as a dict of proto field names."""
    m: dict[str, Any] = {}
    if d := cg.v1.get("pids"):
        m["pids"] = {"current": _int(f"{d}/pids.current"), "limit": _int(f"{d}/pids.max")}
    cpu: dict[str, Any] = {}
    if d := cg.v1.get("cpuacct"):
        stat = read_keyed(f"{d}/cpuacct.stat")
        tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        cpu["usage"] = {
            "total": _int(f"{d}/cpuacct.usage"),
            "kernel": stat.get("system", 0) * tick_ns,
            "user": stat.get("user", 0) * tick_ns,
            "per_cpu": [int(x) for x in read_text(f"{d}/cpuacct.usage_percpu").split()],
        }
    if d := cg.v1.get("cpu"):
        t = read_keyed(f"{d}/cpu.stat")
        cpu["throttling"] = {
            "periods": t.get("nr_periods", 0),
            "throttled_periods": t.get("nr_throttled", 0),
            "throttled_time": t.get("throttled_time", 0),
        }
    if cpu:
        m["cpu"] = cpu
    if d := cg.v1.get("memory"):
        stat = read_keyed(f"{d}/memory.stat")
        mem: dict[str, Any] = {}
        for key in _V1_MEMORY_STAT:
            name = _V1_PROTO_NAMES.get(key, key)
            mem[name] = stat.get(key, 0)
            if not key.startswith("hierarchical"):  # the kernel has no total_ form of these
                mem["total_" + name] = stat.get("total_" + key, 0)

        def usage(prefix: str) -> dict[str, int]:
            return {
                "limit": _int(f"{d}/{prefix}.limit_in_bytes"),
                "usage": _int(f"{d}/{prefix}.usage_in_bytes"),
                "max": _int(f"{d}/{prefix}.max_usage_in_bytes"),
                "failcnt": _int(f"{d}/{prefix}.failcnt"),
            }

        mem["usage"] = usage("memory")
        mem["swap"] = usage("memory.memsw")
        mem["kernel"] = usage("memory.kmem")
        mem["kernel_tcp"] = usage("memory.kmem.tcp")
        m["memory"] = mem
        oom = read_keyed(f"{d}/memory.oom_control")
        m["memory_oom_control"] = {
            "oom_kill_disable": oom.get("oom_kill_disable", 0),
            "under_oom": oom.get("under_oom", 0),
            "oom_kill": oom.get("oom_kill", 0),
        }
    if d := cg.v1.get("blkio"):
        m["blkio"] = _v1_blkio(d)
    return m


_BLKIO_FILES = {
    "io_service_bytes_recursive": "io_service_bytes_recursive",
    "io_serviced_recursive": "io_serviced_recursive",
    "io_queued_recursive": "io_queued_recursive",
    "io_service_time_recursive": "io_service_time_recursive",
    "io_wait_time_recursive": "io_wait_time_recursive",
    "io_merged_recursive": "io_merged_recursive",
    "io_time_recursive": "time_recursive",
    "sectors_recursive": "sectors_recursive",
}


def _v1_blkio(d: str) -> dict[str, Any]:
    """Like containerd/cgroups: the CFQ/BFQ files when they have data, else the throttle ones."""
    out: dict[str, Any] = {}
    prefix = "blkio."
    if not read_text(f"{d}/blkio.io_serviced_recursive").strip():
        prefix = "blkio.throttle."
    for field_name, fname in _BLKIO_FILES.items():
        entries = []
        for line in read_text(f"{d}/{prefix}{fname}").splitlines():
            parts = line.split()
            if len(parts) < 2 or ":" not in parts[0]:
                continue
            major, minor = parts[0].split(":", 1)
            op, value = (parts[1], parts[2]) if len(parts) >= 3 else ("", parts[1])
            if not value.isdigit():
                continue
            entries.append({"op": op, "major": int(major), "minor": int(minor), "value": int(value)})
        if entries:
            out[field_name] = entries
    return out


def v2_metrics(cg: Cgroup) -> dict[str, Any]:
    d = cg.v2
    assert d is not None
    cpu = read_keyed(f"{d}/cpu.stat")
    mem = read_keyed(f"{d}/memory.stat")
    events = read_keyed(f"{d}/memory.events")
    memory: dict[str, Any] = {
        k: mem.get(k, 0)
        for k in (
            "anon", "file", "kernel_stack", "slab", "sock", "shmem", "file_mapped", "file_dirty",
            "file_writeback", "anon_thp", "inactive_anon", "active_anon", "inactive_file", "active_file",
            "unevictable", "slab_reclaimable", "slab_unreclaimable", "pgfault", "pgmajfault",
            "workingset_refault", "workingset_activate", "workingset_nodereclaim", "pgrefill", "pgscan",
            "pgsteal", "pgactivate", "pgdeactivate", "pglazyfree", "pglazyfreed", "thp_fault_alloc",
            "thp_collapse_alloc",
        )
    }  # fmt: skip
    memory.update(
        usage=_int(f"{d}/memory.current"),
        usage_limit=_int(f"{d}/memory.max", UNLIMITED),
        swap_usage=_int(f"{d}/memory.swap.current"),
        swap_limit=_int(f"{d}/memory.swap.max", UNLIMITED),
    )
    return {
        "pids": {"current": _int(f"{d}/pids.current"), "limit": _int(f"{d}/pids.max", UNLIMITED)},
        "cpu": {
            "usage_usec": cpu.get("usage_usec", 0),
            "user_usec": cpu.get("user_usec", 0),
            "system_usec": cpu.get("system_usec", 0),
            "nr_periods": cpu.get("nr_periods", 0),
            "nr_throttled": cpu.get("nr_throttled", 0),
            "throttled_usec": cpu.get("throttled_usec", 0),
        },
        "memory": memory,
        "memory_events": {k: events.get(k, 0) for k in ("low", "high", "max", "oom", "oom_kill")},
    }


# -- OOM ------------------------------------------------------------------------------------

_IN_MODIFY = 0x2


class OOMWatch:
    """The OOM kills in one cgroup.  ``fd`` turns readable when the kernel may have OOM-killed in
    it; :meth:`check` then says whether it did.  v1: an eventfd on ``memory.oom_control``; v2:
    inotify on ``memory.events``, whose ``oom_kill`` count is compared with the last one seen.
    Counting starts here: an OOM kill after the watch is made is news."""

    def __init__(self, cg: Cgroup) -> None:
        d = cg.memory_dir
        if d is None:
            raise OSError(errno.ENOENT, "no memory cgroup")  # no OOM events, as with runc-v2
        self.dir = d
        self.fd = -1
        self._ctl = -1
        self._last = 0
        if cg.v2:
            self._watch_v2()
        else:
            self._watch_v1()

    def _watch_v1(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self._ctl = os.open(f"{self.dir}/memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            with open(f"{self.dir}/cgroup.event_control", "w") as f:
                f.write(f"{self.fd} {self._ctl}")
        except OSError:
            self.close()
            raise

    def _watch_v2(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(fd, f"{self.dir}/memory.events".encode(), _IN_MODIFY) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, "inotify_add_watch")
        self.fd = fd
        self._last = self._oom_kills()

    def _oom_kills(self) -> int:
        return read_keyed(f"{self.dir}/memory.events").get("oom_kill", 0)

    def check(self) -> bool | None:
        """After ``fd`` was readable: True for a new OOM kill, False for none, None once the
        cgroup is gone (the kernel signals its removal too): stop watching then."""
        if self._ctl >= 0:
            try:
                os.eventfd_read(self.fd)
            except BlockingIOError:
                return False
            except OSError:
                return None
            return True if os.path.isdir(self.dir) else None
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 4096)
        if not os.path.isdir(self.dir):
            return None
        now = self._oom_kills()
        if now > self._last:
            self._last = now
            return True
        return False

    def close(self) -> None:
        for fd in (self.fd, self._ctl):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self._ctl = -1
