"""The VM pod (issue 6): start to first output, and what each pod VM costs in memory.

podshim's pods run in a qemu micro-VM (`podshim.io/isolation: vm`); the reference beside them is
an ordinary runc-v2 pod, so the ratio is the price of the kernel boundary.  The compass's goals
are absolute (≤ 2 s to first output, ≤ 128 MB per VM) and stated in the notes.  Under TCG (this
machine kind: no usable KVM) the boot dominates.
"""

from __future__ import annotations

import itertools
import os
import time

from bench.env import ORDER, PODSHIM, RUNC, RUNTIMES, Env
from bench.pods import SLEEPER, log_path, remove_pod, wait_output
from bench.procs import Memory
from bench.stats import ScenarioResult

NAME = "vmpod"
TITLE = "VM pod (podshim.io/isolation=vm) beside a runc-v2 pod: start to first output, memory"
VM = {"podshim.io/isolation": "vm"}


def _qemu_pids(tag: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-system-x86_64") and tag.encode() in b" ".join(argv):
            out.append(int(entry))
    return out


def run(env: Env, iterations: int = 3, warmup: int = 0) -> ScenarioResult:
    res = ScenarioResult(NAME, TITLE)
    ids = itertools.count()
    starts: dict[str, list[float]] = {rt: [] for rt in ORDER}
    rss: dict[str, list[float]] = {rt: [] for rt in ORDER}
    pss: dict[str, list[float]] = {rt: [] for rt in ORDER}
    for i in range(warmup + iterations):
        for rt in ORDER:
            t0 = time.perf_counter()
            pod = env.cri.run_pod(f"vm{next(ids)}", RUNTIMES[rt].handler, VM if rt == PODSHIM else {})
            try:
                env.cri.run_container(pod, "c0", SLEEPER, image=env.image)
                wait_output(log_path(pod, "c0"), "ready", timeout=120)
                elapsed = time.perf_counter() - t0
                if rt == PODSHIM:
                    pids = _qemu_pids(pod.id[:32])
                    mem = Memory.of(pids[0]) if pids else None
                else:
                    # What the pod costs the node beyond its containers: its shim.
                    from bench.procs import shim_pid

                    mem = Memory.of(shim_pid(RUNTIMES[RUNC].binary, pod.id))
            finally:
                remove_pod(env, pod)
            if i >= warmup:
                starts[rt].append(elapsed)
                if mem is not None:
                    rss[rt].append(mem.rss)
                    pss[rt].append(mem.pss)
    res.row("VM pod start to first output (runc-v2: a process pod)", "s", starts)
    if rss[PODSHIM]:
        res.row("qemu RSS per VM pod (runc-v2: its shim)", "KiB", rss)
        res.row("qemu PSS per VM pod (runc-v2: its shim)", "KiB", pss)
    res.notes.append(
        "Goals for a VM pod (absolute): start to first output ≤ 2 s, qemu ≤ 128 MB per pod. "
        "Measured under TCG where no usable KVM exists; see docs/vm-isolation.md."
    )
    return res
