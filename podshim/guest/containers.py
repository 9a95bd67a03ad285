"""Containers and their processes in the guest: exits, cgroup, OOM kills and stats."""

from __future__ import annotations

import contextlib
import os
import select
import threading
from typing import TYPE_CHECKING, Any

from podshim.guest.paths import CGROUP_ROOT
from podshim.guest.reaper import REAPER
from podshim.guest.stdio import Stdio
from podshim.system.children import Exit
from podshim.system.fds import close_fds

if TYPE_CHECKING:
    from podshim.guest.agent import Agent


class Proc:
    def __init__(self, container: Container, exec_id: str, stdio: Stdio) -> None:
        self.container = container
        self.exec_id = exec_id
        self.stdio = stdio
        self.pid = 0
        self.status: int | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.container.id,
            "exec_id": self.exec_id,
            "pid": self.pid,
            "exited": self.status is not None,
            "status": self.status or 0,
        }

    def claim(self, pid: int) -> None:
        self.pid = pid
        REAPER.claim(pid, self._exited)

    def _exited(self, ex: Exit) -> None:
        self.container.agent.process_exited(self, ex.status)


class Container:
    def __init__(self, agent: Agent, cid: str, bundle: str) -> None:
        self.agent = agent
        self.id = cid
        self.bundle = bundle
        self.init: Proc | None = None
        self.execs: dict[str, Proc] = {}
        self.cgroup = ""
        self._oom_stop: int = -1

    def find_cgroup(self) -> None:
        assert self.init is not None
        with contextlib.suppress(OSError), open(f"/proc/{self.init.pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    self.cgroup = CGROUP_ROOT + line[3:].strip()

    def watch_oom(self) -> None:
        """memory.events changes wake poll() with POLLPRI; each rise of oom_kill is an event."""
        if not self.cgroup or self._oom_stop >= 0:
            return
        path = os.path.join(self.cgroup, "memory.events")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        stop_r, self._oom_stop = os.pipe()

        def count() -> int:
            return _kv_fd(fd).get("oom_kill", 0)

        # Counted before the thread starts, at create: an OOM kill right after start is news.
        seen = count()

        def loop() -> None:
            nonlocal seen
            poller = select.poll()
            poller.register(fd, select.POLLPRI | select.POLLERR)
            poller.register(stop_r, select.POLLIN)
            try:
                while True:
                    ready = dict(poller.poll())
                    if stop_r in ready:
                        return
                    now = count()
                    if now > seen:
                        self.agent.event({"event": "oom", "id": self.id})
                    seen = now
            except OSError:
                return
            finally:
                close_fds(fd, stop_r)

        threading.Thread(target=loop, name=f"oom-{self.id}", daemon=True).start()

    def stop_oom(self) -> None:
        close_fds(self._oom_stop)
        self._oom_stop = -1

    def processes(self) -> list[Proc]:
        return ([self.init] if self.init else []) + list(self.execs.values())


def _kv_fd(fd: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in os.pread(fd, 4096, 0).decode().splitlines():
            k, _, v = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[k] = int(v)
    return out


def _kv(path: str) -> dict[str, int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        return _kv_fd(fd)
    finally:
        os.close(fd)


def _int(path: str) -> int:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return 0
    if text == "max":
        return 2**64 - 1  # containerd's "unlimited"
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return 0


MEMORY_STAT_KEYS = (
    "anon", "file", "kernel_stack", "slab", "sock", "shmem", "file_mapped", "file_dirty",
    "file_writeback", "anon_thp", "inactive_anon", "active_anon", "inactive_file", "active_file",
    "unevictable", "slab_reclaimable", "slab_unreclaimable", "pgfault", "pgmajfault",
    "workingset_refault", "workingset_activate", "workingset_nodereclaim", "pgrefill", "pgscan",
    "pgsteal", "pgactivate", "pgdeactivate", "pglazyfree", "pglazyfreed", "thp_fault_alloc",
    "thp_collapse_alloc",
)  # fmt: skip


def cgroup_v2_metrics(d: str) -> dict[str, Any]:
    """The fields of containerd's cgroups v2 Metrics, as the host's runc backend reports them."""
    cpu = _kv(f"{d}/cpu.stat")
    mem = _kv(f"{d}/memory.stat")
    events = _kv(f"{d}/memory.events")
    memory: dict[str, Any] = {k: mem.get(k, 0) for k in MEMORY_STAT_KEYS}
    memory.update(
        usage=_int(f"{d}/memory.current"),
        usage_limit=_int(f"{d}/memory.max"),
        swap_usage=_int(f"{d}/memory.swap.current"),
        swap_limit=_int(f"{d}/memory.swap.max"),
    )
    return {
        "pids": {"current": _int(f"{d}/pids.current"), "limit": _int(f"{d}/pids.max")},
        "cpu": {
            k: cpu.get(k, 0)
            for k in (
                "usage_usec",
                "user_usec",
                "system_usec",
                "nr_periods",
                "nr_throttled",
                "throttled_usec",
            )  # fmt: skip
        },
        "memory": memory,
        "memory_events": {k: events.get(k, 0) for k in ("low", "high", "max", "oom", "oom_kill")},
    }


def vm_stats() -> dict[str, Any]:
    info = {}
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            with contextlib.suppress(ValueError, IndexError):
                info[k] = int(v.split()[0]) * 1024
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    cpu = _kv(f"{CGROUP_ROOT}/cpu.stat")
    return {
        "mem_total": info.get("MemTotal", 0),
        "mem_available": info.get("MemAvailable", 0),
        "uptime": uptime,
        "cpu_usage_usec": cpu.get("usage_usec", 0),
    }
