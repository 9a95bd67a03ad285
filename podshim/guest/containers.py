"""Containers and their processes in the guest: exits, cgroup, OOM kills and stats."""

from __future__ import annotations

import contextlib
import os
import select
import threading
from typing import TYPE_CHECKING, Any

from podshim.guest.errors import FailedPrecondition, InvalidArgument
from podshim.guest.reaper import REAPER
from podshim.guest.stdio import Stdio
from podshim.system import cgroupfs
from podshim.system.cgroupfs import CGROUP_ROOT, Cgroup, OOMWatch, read_keyed
from podshim.system.children import Exit
from podshim.system.fds import close_fds

if TYPE_CHECKING:
    from podshim.guest.agent import Agent

HELD_CONTROLLERS = ("cpu", "memory", "pids", "io")


class Proc:
    def __init__(self, container: Container, exec_id: str, stdio: Stdio) -> None:
        self.container = container
        self.exec_id = exec_id
        self.stdio = stdio
        self.pid = 0
        self.status: int | None = None
        self.done = threading.Event()

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
        REAPER.claim(pid, self.exited)

    def exited(self, ex: Exit) -> None:
        self.container.agent.process_exited(self, ex.status)
        self.done.set()


class Container:
    def __init__(self, agent: Agent, cid: str, bundle: str, held: bool = False) -> None:
        self.agent = agent
        self.id = cid
        self.bundle = bundle
        # The pod's sandbox, held by the agent (:mod:`podshim.guest.holder`): no runc container.
        self.held = held
        self.init: Proc | None = None
        self.execs: dict[str, Proc] = {}
        self.cgroup: Cgroup | None = None
        self._oom_stop: int = -1

    def held_pid(self) -> int:
        """The holder's pid while it lives, else FailedPrecondition."""
        p = self.init
        if p is None or not p.pid or p.status is not None:
            raise FailedPrecondition("process already finished")
        return p.pid

    def place_in_cgroup(self, path: str) -> None:
        """Put the holder in ``path`` (the sandbox's cgroups path, below the guest's root), with
        the controllers its stats read enabled on the way, as the runtime does for a container."""
        assert self.init is not None
        if not os.path.normpath("/" + path).strip("/") or ".." in path.split("/"):
            raise InvalidArgument(f"bad cgroups path {path!r}")
        cg = cgroupfs.cgroup_at(path)
        cgroupfs.create(cg, HELD_CONTROLLERS)
        cgroupfs.join(cg, self.init.pid)
        self.cgroup = cg

    def freeze(self, frozen: bool) -> None:
        if self.cgroup is None:
            raise FailedPrecondition(f"{self.id} has no cgroup to freeze")
        cgroupfs.freeze(self.cgroup, frozen)

    def remove_cgroup(self) -> None:
        if self.cgroup is not None and self.cgroup.v2 is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self.cgroup.v2)

    def find_cgroup(self) -> None:
        assert self.init is not None
        self.cgroup = Cgroup.of_pid(self.init.pid)

    def watch_oom(self) -> None:
        """The shared OOM watch, polled by a thread of this container's."""
        if self.cgroup is None or self._oom_stop >= 0:
            return
        try:
            # Made at create: an OOM kill right after start is news.
            watch = OOMWatch(self.cgroup)
        except OSError:
            return
        stop_r, self._oom_stop = os.pipe()

        def loop() -> None:
            poller = select.poll()
            poller.register(watch.fd, select.POLLIN)
            poller.register(stop_r, select.POLLIN)
            try:
                while True:
                    ready = dict(poller.poll())
                    if stop_r in ready:
                        return
                    oom = watch.check()
                    if oom is None:
                        return
                    if oom:
                        self.agent.event({"event": "oom", "id": self.id})
            except OSError:
                return
            finally:
                watch.close()
                close_fds(stop_r)

        threading.Thread(target=loop, name=f"oom-{self.id}", daemon=True).start()

    def stop_oom(self) -> None:
        close_fds(self._oom_stop)
        self._oom_stop = -1

    def processes(self) -> list[Proc]:
        return ([self.init] if self.init else []) + list(self.execs.values())


def vm_stats() -> dict[str, Any]:
    info = {}
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            with contextlib.suppress(ValueError, IndexError):
                info[k] = int(v.split()[0]) * 1024
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    cpu = read_keyed(f"{CGROUP_ROOT}/cpu.stat")
    return {
        "mem_total": info.get("MemTotal", 0),
        "mem_available": info.get("MemAvailable", 0),
        "uptime": uptime,
        "cpu_usage_usec": cpu.get("usage_usec", 0),
    }
