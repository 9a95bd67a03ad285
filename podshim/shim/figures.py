"""The shim's figures as metric families for Diag.Metrics: the counters it keeps (telemetry),
and what /proc says about it (and about qemu, for VM pods) at the time of the request."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from podshim import oci
from podshim.api import diag_pb2 as D
from podshim.errdefs import Code
from podshim.process import Exec, ExecState
from podshim.shim.telemetry import Histogram, Telemetry
from podshim.task import Task

CONTAINER_NAME = "io.kubernetes.cri.container-name"


def proc_memory(pid: int | str = "self") -> tuple[int, int]:
    """(RSS, PSS) in bytes from smaps_rollup; zeros when unreadable."""
    rss = pss = 0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key == "Rss":
                rss = int(rest.split()[0]) * 1024
            elif key == "Pss":
                pss = int(rest.split()[0]) * 1024
    return rss, pss


def proc_cpu_seconds(pid: int | str = "self") -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_threads(pid: int | str = "self") -> int:
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def add_histogram(f: D.MetricFamily, h: Histogram, labels: dict[str, str]) -> None:
    f.samples.add(labels=labels, value=h.sum, count=h.count,
                  bucket_bounds=[*h.bounds, float("inf")], bucket_counts=h.cumulative())  # fmt: skip


def state_name(task: Task, e: Exec) -> str:
    if e.state is ExecState.DELETED:
        return "deleted"
    return task.status_of(e).name.lower()


def families(t: Telemetry, tasks: list[Task], vm: Any) -> list[D.MetricFamily]:
    """Everything Diag.Metrics reports, as label-free families (the monitor adds the pod's labels)."""
    fams: list[D.MetricFamily] = []

    def fam(name: str, kind: str, help: str) -> D.MetricFamily:
        f = D.MetricFamily(name=name, type=kind, help=help)
        fams.append(f)
        return f

    f = fam("podshim_ttrpc_requests_total", "counter", "ttrpc requests served, by service, method and code")
    for (service, method, code), n in sorted(t.requests.items()):
        f.samples.add(labels={"service": service, "method": method, "code": Code(code).name}, value=n)
    f = fam("podshim_ttrpc_request_duration_seconds", "histogram", "ttrpc request latency")
    for (service, method), h in sorted(t.latency.items()):
        add_histogram(f, h, {"service": service, "method": method})

    by_task: dict[str, int] = {}
    by_exec: dict[str, int] = {}
    for task in tasks:
        s = state_name(task, task.init)
        by_task[s] = by_task.get(s, 0) + 1
        for e in task.execs.values():
            s = state_name(task, e)
            by_exec[s] = by_exec.get(s, 0) + 1
    f = fam("podshim_tasks", "gauge", "tasks (containers) by state")
    for s, n in sorted(by_task.items()):
        f.samples.add(labels={"state": s}, value=n)
    f = fam("podshim_execs", "gauge", "additional execs by state")
    for s, n in sorted(by_exec.items()):
        f.samples.add(labels={"state": s}, value=n)

    f = fam("podshim_events_total", "counter", "task events: published, retried (per attempt), dropped")
    for outcome, n in t.events.items():
        f.samples.add(labels={"outcome": outcome}, value=n)

    rss, pss = proc_memory()
    cpu = proc_cpu_seconds()
    fam("podshim_shim_open_fds", "gauge", "the shim's open file descriptors").samples.add(
        value=len(os.listdir("/proc/self/fd"))
    )
    fam("podshim_shim_threads", "gauge", "the shim's threads").samples.add(value=proc_threads())
    f = fam(
        "podshim_shim_memory_bytes",
        "gauge",
        "the shim's resident memory (rss) and proportional share (pss)",
    )
    f.samples.add(labels={"kind": "rss"}, value=rss)
    f.samples.add(labels={"kind": "pss"}, value=pss)
    fam("podshim_shim_cpu_seconds_total", "counter", "the shim's CPU time").samples.add(value=cpu)
    fam("podshim_shim_start_time_seconds", "gauge", "when the shim started (unix time)").samples.add(
        value=t.started_at
    )

    names = {task.id: oci.of(task.spec).get(CONTAINER_NAME, "") or task.id for task in tasks}
    f1 = fam("podshim_container_create_to_start_seconds", "gauge", "from Create to the init's start")
    f2 = fam("podshim_container_start_to_exit_seconds", "gauge", "from the init's start to its first exit")
    for (cid, eid), lc in t.lifecycles.items():
        if eid or cid not in names:
            continue
        labels = {"container": names[cid], "container_id": cid}
        if lc.started:
            f1.samples.add(labels=labels, value=lc.started - lc.created)
            if lc.exited:
                f2.samples.add(labels=labels, value=lc.exited - lc.started)
    f = fam("podshim_create_to_start_seconds", "histogram", "Create to start, all containers")
    add_histogram(f, t.create_to_start, {})
    f = fam("podshim_start_to_exit_seconds", "histogram", "start to first exit, all containers")
    add_histogram(f, t.start_to_exit, {})

    vm_rss = vm_pss = 0
    vm_cpu = 0.0
    if vm is not None:
        from podshim.backends.vm import diag as vmdiag

        fams.extend(vmdiag.families(vm, t))
        vm_rss, vm_pss, vm_cpu = vmdiag.qemu_usage(vm)
    f = fam("podshim_pod_overhead_memory_bytes", "gauge",
            "what the pod costs beyond its containers: the shim plus qemu (rss, pss)")  # fmt: skip
    f.samples.add(labels={"kind": "rss"}, value=rss + vm_rss)
    f.samples.add(labels={"kind": "pss"}, value=pss + vm_pss)
    fam("podshim_pod_overhead_cpu_seconds_total", "counter",
        "CPU time of the shim plus qemu").samples.add(value=cpu + vm_cpu)  # fmt: skip
    return fams
