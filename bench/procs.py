"""What /proc says about a shim: memory, descriptors, and which process it is."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from cri.harness import shim_servers


@dataclass(frozen=True)
class Memory:
    """KiB. PSS splits shared pages among the processes that map them, so a per-pod sum of PSS
    is what the node really pays; RSS counts the shared interpreter pages in full for each."""

    rss: int
    pss: int
    uss: int  # private clean + dirty: what killing the process would free

    @staticmethod
    def of(pid: int) -> Memory:
        rss = pss = uss = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == "Rss":
                rss = int(rest.split()[0])
            elif key == "Pss":
                pss = int(rest.split()[0])
            elif key in ("Private_Clean", "Private_Dirty"):
                uss += int(rest.split()[0])
        return Memory(rss, pss, uss)


def forked_from_zygote(pid: int) -> bool:
    """Whether podshim's zygote forked this server: a cold process's argv lies on its stack, a
    zygote worker points the kernel at a copy on its heap (prctl PR_SET_MM_MAP), below it."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rfind(")") + 2 :].split()  # fields[0] is field 3 of proc(5)
    return int(fields[45]) < int(fields[25])  # arg_start < start_stack


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def shim_pid(binary: str, task_id: str, timeout: float = 10.0) -> int:
    """The one server process of `binary` serving `task_id` (a pod's id for a pod's shim)."""
    deadline = time.monotonic() + timeout
    while True:
        found = shim_servers(binary, task_id)
        if len(found) == 1:
            return found[0].pid
        if time.monotonic() > deadline:
            raise RuntimeError(f"expected one {binary} server for {task_id[:12]}, found {found}")
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    """Direct children (all threads' children lists)."""
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return out


def settle(seconds: float = 0.3) -> None:
    """Let a shim finish what follows a reply (event forwarding, log writes) before reading /proc."""
    time.sleep(seconds)


def cpu_ns(pid: int) -> int:
    """CPU time the process has used, in ns, over all its threads (schedstat: exact, unlike the
    10 ms ticks of /proc/<pid>/stat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total
