"""A container's cgroup: where it is, its metrics (spec §5.6) and its OOM kills (spec §5.5).

On a hybrid host (cgroup v1 controllers beside an empty v2 tree, like this machine kind) the
v1 controllers are authoritative.  A pure v2 host has ``cgroup.controllers`` at the root.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CGROUP_ROOT = "/sys/fs/cgroup"


def unified_host() -> bool:
    return os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers"))


@dataclass(frozen=True)
class Cgroup:
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


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _int(path: str) -> int:
    text = _read(path).strip()
    if not text or text == "max":
        return 0
    try:
        return int(text.split()[0])
    except ValueError:
        return 0


def _kv(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in _read(path).splitlines():
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
        stat = _kv(f"{d}/cpuacct.stat")
        tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        cpu["usage"] = {
            "total": _int(f"{d}/cpuacct.usage"),
            "kernel": stat.get("system", 0) * tick_ns,
            "user": stat.get("user", 0) * tick_ns,
            "per_cpu": [int(x) for x in _read(f"{d}/cpuacct.usage_percpu").split()],
        }
    if d := cg.v1.get("cpu"):
        t = _kv(f"{d}/cpu.stat")
        cpu["throttling"] = {
            "periods": t.get("nr_periods", 0),
            "throttled_periods": t.get("nr_throttled", 0),
            "throttled_time": t.get("throttled_time", 0),
        }
    if cpu:
        m["cpu"] = cpu
    if d := cg.v1.get("memory"):
        stat = _kv(f"{d}/memory.stat")
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
        oom = _kv(f"{d}/memory.oom_control")
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
    if not _read(f"{d}/blkio.io_serviced_recursive").strip():
        prefix = "blkio.throttle."
    for field_name, fname in _BLKIO_FILES.items():
        entries = []
        for line in _read(f"{d}/{prefix}{fname}").splitlines():
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
    cpu = _kv(f"{d}/cpu.stat")
    mem = _kv(f"{d}/memory.stat")
    events = _kv(f"{d}/memory.events")
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
        usage_limit=_int(f"{d}/memory.max"),
        swap_usage=_int(f"{d}/memory.swap.current"),
        swap_limit=_int(f"{d}/memory.swap.max"),
    )
    return {
        "pids": {"current": _int(f"{d}/pids.current"), "limit": _int(f"{d}/pids.max")},
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


V1_METRICS_URL = "io.containerd.cgroups.v1.Metrics"
V2_METRICS_URL = "io.containerd.cgroups.v2.Metrics"


def metrics(cg: Cgroup | None) -> tuple[str, bytes]:
    """Stats as containerd decodes them: (type url, encoded cgroups Metrics) (spec §5.6)."""
    from podshim import errdefs

    if cg is None or not cg.exists():
        raise errdefs.NotFound("cgroup does not exist")  # what runc-v2 says; CRI skips it
    # The messages take nested dicts directly; json_format would cost every shim ~4 MiB.
    if cg.v2:
        from podshim.api import cgroups_v2_pb2

        return V2_METRICS_URL, cgroups_v2_pb2.Metrics(**v2_metrics(cg)).SerializeToString()
    from podshim.api import cgroups_v1_pb2

    return V1_METRICS_URL, cgroups_v1_pb2.Metrics(**v1_metrics(cg)).SerializeToString()


# -- OOM ------------------------------------------------------------------------------------

_IN_MODIFY = 0x2
_libc = ctypes.CDLL(None, use_errno=True)


class OOMWatcher:
    """Calls back with a container id each time the kernel OOM-kills inside its cgroup."""

    def __init__(self, on_oom: Callable[[str], None]) -> None:
        self._on_oom = on_oom
        self._watches: dict[str, Callable[[], None]] = {}

    def add(self, container_id: str, cg: Cgroup) -> None:
        if container_id in self._watches:
            return
        try:
            if cg.v2:
                self._watches[container_id] = self._watch_v2(container_id, cg.v2)
            elif mem := cg.v1.get("memory"):
                self._watches[container_id] = self._watch_v1(container_id, mem)
        except OSError:
            pass  # no memory controller here: no OOM events, as with runc-v2

    def remove(self, container_id: str) -> None:
        stop = self._watches.pop(container_id, None)
        if stop:
            stop()

    def close(self) -> None:
        for cid in list(self._watches):
            self.remove(cid)

    def _watch_v1(self, cid: str, memdir: str) -> Callable[[], None]:
        loop = asyncio.get_running_loop()
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        ctl = os.open(f"{memdir}/memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with open(f"{memdir}/cgroup.event_control", "w") as f:
                f.write(f"{efd} {ctl}")
        except OSError:
            os.close(efd)
            os.close(ctl)
            raise

        def ready() -> None:
            try:
                os.eventfd_read(efd)
            except BlockingIOError:
                return
            except OSError:
                stop()
                return
            if not os.path.isdir(memdir):
                # The kernel also signals the eventfd when the cgroup is removed.
                stop()
                return
            self._on_oom(cid)

        def stop() -> None:
            loop.remove_reader(efd)
            for fd in (efd, ctl):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._watches.pop(cid, None)

        loop.add_reader(efd, ready)
        return stop

    def _watch_v2(self, cid: str, d: str) -> Callable[[], None]:
        loop = asyncio.get_running_loop()
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if _libc.inotify_add_watch(fd, f"{d}/memory.events".encode(), _IN_MODIFY) < 0:
            os.close(fd)
            raise OSError(ctypes.get_errno(), "inotify_add_watch")
        last = _kv(f"{d}/memory.events").get("oom_kill", 0)

        def ready() -> None:
            nonlocal last
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 4096)
            if not os.path.isdir(d):
                stop()
                return
            now = _kv(f"{d}/memory.events").get("oom_kill", 0)
            if now > last:
                last = now
                self._on_oom(cid)

        def stop() -> None:
            loop.remove_reader(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
            self._watches.pop(cid, None)

        loop.add_reader(fd, ready)
        return stop




# -- cgroups the shim makes itself (host-process containers) ----------------------------------

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


def _dirs(cg: Cgroup) -> list[str]:
    return [cg.v2] if cg.v2 else list(cg.v1.values())


def create(cg: Cgroup) -> None:
    for d in _dirs(cg):
        os.makedirs(d, exist_ok=True)


def join(cg: Cgroup, pid: int = 0) -> None:
    """Move pid (0: the caller) into every directory of the cgroup."""
    for d in _dirs(cg):
        with open(os.path.join(d, "cgroup.procs"), "w") as f:
            f.write(str(pid))


def _write(path: str, value: object) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def set_resources(cg: Cgroup, res: dict[str, Any]) -> None:
    """The OCI LinuxResources that matter for a host process: memory, CPU and pids limits."""
    mem = res.get("memory") or {}
    cpu = res.get("cpu") or {}
    pids = res.get("pids") or {}
    if cg.v2:
        v2 = cg.v2
        if mem.get("limit"):
            _write(f"{v2}/memory.max", mem["limit"] if mem["limit"] > 0 else "max")
        if cpu.get("quota") or cpu.get("period"):
            quota = cpu.get("quota") or 0
            _write(f"{v2}/cpu.max", f"{quota if quota > 0 else 'max'} {cpu.get('period') or 100000}")
        if cpu.get("shares"):
            # The kernel's shares -> weight mapping, as runc does it.
            _write(f"{v2}/cpu.weight", 1 + ((int(cpu["shares"]) - 2) * 9999) // 262142)
        if pids.get("limit"):
            _write(f"{v2}/pids.max", pids["limit"] if pids["limit"] > 0 else "max")
        return
    if (md := cg.v1.get("memory")) and mem.get("limit"):
        _write(f"{md}/memory.limit_in_bytes", mem["limit"])
    if cd := cg.v1.get("cpu"):
        if cpu.get("shares"):
            _write(f"{cd}/cpu.shares", cpu["shares"])
        if cpu.get("period"):
            _write(f"{cd}/cpu.cfs_period_us", cpu["period"])
        if cpu.get("quota"):
            _write(f"{cd}/cpu.cfs_quota_us", cpu["quota"])
    if (pd := cg.v1.get("pids")) and pids.get("limit"):
        _write(f"{pd}/pids.max", pids["limit"] if pids["limit"] > 0 else "max")


def freeze(cg: Cgroup, frozen: bool) -> None:
    if cg.v2:
        _write(f"{cg.v2}/cgroup.freeze", 1 if frozen else 0)
    elif fd := cg.v1.get("freezer"):
        _write(f"{fd}/freezer.state", "FROZEN" if frozen else "THAWED")
    else:
        raise OSError("no freezer cgroup: cannot pause")


def remove(cg: Cgroup) -> None:
    """rmdir every directory; the caller has emptied the cgroup first."""
    for d in _dirs(cg):
        for _ in range(50):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                # Just-killed processes leave the cgroup a moment after their death is reaped.
                time.sleep(0.01)


def _subtree(cg: Cgroup) -> list[str]:
    """Every directory of the cgroup and of any cgroup made below it, deepest first."""
    out: list[str] = []
    for top in _dirs(cg):
        for dirpath, _dirs_below, _files in os.walk(top, topdown=False):
            out.append(dirpath)
    return out


def _procs(dirs: list[str]) -> set[int]:
    pids: set[int] = set()
    for d in dirs:
        with contextlib.suppress(OSError, ValueError), open(os.path.join(d, "cgroup.procs")) as f:
            pids.update(int(x) for x in f.read().split())
    return pids


def destroy(cg: Cgroup, timeout: float = 2.0) -> bool:
    """Kill every process of the cgroup (its sub-cgroups included) and remove it, for the shim's
    ``delete`` action after the server is gone: blocking, bounded by ``timeout``.

    v2: ``cgroup.kill`` (Linux 5.14+).  v1, or an older v2: freeze, so nothing forks while the
    list is read, SIGKILL every process, thaw (the kill lands on thaw).  True when it is gone."""
    import signal

    deadline = time.monotonic() + timeout
    dirs = _subtree(cg)
    if not dirs:
        return True
    killed = False
    if cg.v2 and os.path.exists(os.path.join(cg.v2, "cgroup.kill")):
        with contextlib.suppress(OSError):
            _write(os.path.join(cg.v2, "cgroup.kill"), 1)
            killed = True
    if not killed:
        frozen = False
        with contextlib.suppress(OSError):
            freeze(cg, True)
            frozen = True
        state = os.path.join(cg.v1.get("freezer", ""), "freezer.state")
        while frozen and cg.v1.get("freezer") and time.monotonic() < deadline:
            if _read(state).strip() != "FREEZING":
                break
            time.sleep(0.01)
        for pid in _procs(dirs):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if frozen:
            with contextlib.suppress(OSError):
                freeze(cg, False)
    while True:
        left = [d for d in dirs if os.path.isdir(d)]
        for d in left:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        if not any(os.path.isdir(d) for d in dirs):
            return True
        if time.monotonic() >= deadline:
            return False
        # Killed processes leave the cgroup a moment after they die; some may have forked
        # before the freeze took: kill again what is still there.
        for pid in _procs(dirs):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def to_record(cg: Cgroup) -> dict[str, Any]:
    return {"v1": dict(cg.v1), "v2": cg.v2}


def from_record(record: object) -> Cgroup:
    """A cgroup written by ``to_record``; ValueError unless every directory is below the
    cgroup root."""
    if not isinstance(record, dict):
        raise ValueError("not a cgroup record")
    v1 = record.get("v1", {})
    v2 = record.get("v2")
    if not isinstance(v1, dict) or not (v2 is None or isinstance(v2, str)):
        raise ValueError("not a cgroup record")
    cg = Cgroup({str(k): str(v) for k, v in v1.items()}, v2)
    roots = [(v2, CGROUP_ROOT)] if v2 else [(d, os.path.join(CGROUP_ROOT, c)) for c, d in cg.v1.items()]
    for d, root in roots:
        if os.path.normpath(d) != d or not d.startswith(root + "/") or "/" in root[len(CGROUP_ROOT) + 1 :]:
            raise ValueError(f"{d!r} is not a container cgroup")
    return cg
