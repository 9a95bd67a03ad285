"""The shim's cgroups: metrics encoded as containerd decodes them (spec §5.6), OOM kills
watched from the event loop (spec §5.5), and the cgroups it makes itself for host-process
containers.  The reading is :mod:`podshim.system.cgroupfs`, which the guest agent shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

from podshim import errdefs
from podshim.system.cgroupfs import CGROUP_ROOT as CGROUP_ROOT
from podshim.system.cgroupfs import Cgroup as Cgroup
from podshim.system.cgroupfs import OOMWatch
from podshim.system.cgroupfs import cgroup_at as cgroup_at
from podshim.system.cgroupfs import create as create
from podshim.system.cgroupfs import dirs as _dirs
from podshim.system.cgroupfs import freeze as freeze
from podshim.system.cgroupfs import join as join
from podshim.system.cgroupfs import unified_host as unified_host
from podshim.system.cgroupfs import v1_metrics as v1_metrics
from podshim.system.cgroupfs import v2_metrics as v2_metrics
from podshim.system.cgroupfs import write as _write
from podshim.system.fds import read_text

V1_METRICS_URL = "io.containerd.cgroups.v1.Metrics"
V2_METRICS_URL = "io.containerd.cgroups.v2.Metrics"
METRICS_MODULES = ("podshim.api.cgroups_v1_pb2", "podshim.api.cgroups_v2_pb2")
"""What ``metrics`` encodes with: a backend that reports stats preloads them (backends.base)."""


def metrics(cg: Cgroup | None) -> tuple[str, bytes]:
    """Stats as containerd decodes them: (type url, encoded cgroups Metrics) (spec §5.6)."""
    if cg is None or not cg.exists():
        raise errdefs.NotFound("cgroup does not exist")  # what runc-v2 says; CRI skips it
    # The messages take nested dicts directly; json_format would cost every shim ~4 MiB.
    if cg.v2:
        from podshim.api import cgroups_v2_pb2

        return V2_METRICS_URL, cgroups_v2_pb2.Metrics(**v2_metrics(cg)).SerializeToString()
    from podshim.api import cgroups_v1_pb2

    return V1_METRICS_URL, cgroups_v1_pb2.Metrics(**v1_metrics(cg)).SerializeToString()


# -- OOM ------------------------------------------------------------------------------------


class OOMWatcher:
    """Calls back with a container id each time the kernel OOM-kills inside its cgroup."""

    def __init__(self, on_oom: Callable[[str], None]) -> None:
        self._on_oom = on_oom
        self._watches: dict[str, tuple[OOMWatch, asyncio.AbstractEventLoop]] = {}

    def add(self, container_id: str, cg: Cgroup) -> None:
        if container_id in self._watches:
            return
        try:
            watch = OOMWatch(cg)
        except OSError:
            return  # no memory controller here: no OOM events, as with runc-v2
        loop = asyncio.get_running_loop()
        self._watches[container_id] = (watch, loop)

        def ready() -> None:
            oom = watch.check()
            if oom is None:
                self.remove(container_id)
            elif oom:
                self._on_oom(container_id)

        loop.add_reader(watch.fd, ready)

    def remove(self, container_id: str) -> None:
        entry = self._watches.pop(container_id, None)
        if entry is not None:
            watch, loop = entry
            loop.remove_reader(watch.fd)
            watch.close()

    def close(self) -> None:
        for cid in list(self._watches):
            self.remove(cid)


# -- cgroups the shim makes itself (host-process containers; cgroup_at, create, join and
# freeze are cgroupfs's, shared with the guest agent) ------------------------------------------

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


async def remove(cg: Cgroup, attempts: int = 50, pause: float = 0.01) -> None:
    """rmdir every directory; the caller has emptied the cgroup first.  Just-killed processes
    leave the cgroup a moment after their death is reaped (on v1, up to seconds): retry, with
    the loop free in between."""
    for d in _dirs(cg):
        for attempt in range(attempts):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(pause)


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
            if read_text(state).strip() != "FREEZING":
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
