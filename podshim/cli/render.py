"""How ``podshim ps``, ``tasks`` and ``top`` show what the shims report: a rich tree, tables,
and the same data as JSON."""

from __future__ import annotations

import time
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from rich.table import Table
from rich.tree import Tree

from podshim.api import diag_pb2 as D
from podshim.cli.diag import ShimView

MODE_NAMES = {"process": "process", "host": "host", "vm": "vm", "": "-"}


def mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB" if n else "-"


def seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def age(ts: Timestamp, now: float | None = None) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    s = max(0, int((now or time.time()) - seconds(ts)))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d"


def state(e: D.ExecInfo) -> str:
    if e.state in ("stopped", "deleted"):
        return f"{e.state}({e.exit_status})"
    return e.state


def _exec_line(e: D.ExecInfo) -> str:
    up = age(e.started_at) if e.state == "running" else "-"
    return f"exec [bold]{e.id}[/] · {state(e)} · pid {e.pid or '-'} · up {up}"


def _task_line(t: D.TaskInfo) -> str:
    name = f"{t.name} ({t.id[:12]})" if t.name else t.id[:12] if t.kind == "sandbox" else t.id
    init = t.init
    up = age(init.started_at) if init.state == "running" else "-"
    return f"{t.kind} [bold]{name}[/] · {state(init)} · pid {init.pid or '-'} · up {up}"


def shim_line(v: ShimView) -> str:
    s = v.shim
    head = f"[bold]shim {s.pid}[/] · containerd {s.containerd_address} · namespace {s.namespace}"
    if v.tasks is None:
        return f"{head} · [red]not answering: {v.error}[/]"
    info = v.tasks.shim
    head += f" · up {age(info.started_at)} · RSS {mib(info.rss_bytes)} PSS {mib(info.pss_bytes)}"
    if info.vm_pid:
        head += f" · VM pid {info.vm_pid} RSS {mib(info.vm_rss_bytes)} PSS {mib(info.vm_pss_bytes)}"
    return head


def pod_line(pod: D.PodInfo) -> str:
    mode = MODE_NAMES.get(pod.isolation, pod.isolation)
    if pod.name:
        return f"pod [bold]{pod.namespace}/{pod.name}[/] ({pod.id[:12]}) · {mode}"
    return f"standalone [bold]{pod.id}[/] · {mode}"


def ps_tree(views: list[ShimView]) -> Tree:
    root = Tree(f"podshim on this node: {len(views)} shim(s)")
    for v in views:
        node = root.add(shim_line(v))
        if v.tasks is None:
            continue
        pod = node.add(pod_line(v.tasks.pod))
        for t in v.tasks.tasks:
            tnode = pod.add(_task_line(t))
            for e in t.execs:
                tnode.add(_exec_line(e))
    return root


def tasks_table(v: ShimView) -> Table:
    assert v.tasks is not None
    table = Table(title=f"tasks of {v.label()}")
    for col in ("task", "kind", "exec", "state", "pid", "created", "started", "exited"):
        table.add_column(col)

    def ts(t: Timestamp) -> str:
        return time.strftime("%H:%M:%S", time.localtime(seconds(t))) if t.seconds else "-"

    for t in v.tasks.tasks:
        for e in [t.init, *t.execs]:
            table.add_row(
                (f"{t.name} ({t.id[:12]})" if t.name else t.id) if not e.id else "",
                t.kind if not e.id else "",
                e.id or "(init)",
                state(e),
                str(e.pid or "-"),
                ts(e.created_at),
                ts(e.started_at),
                ts(e.exited_at),
            )
    return table


def top_table(views: list[ShimView], cpu_rates: dict[int, float]) -> Table:
    table = Table(title=f"podshim top · {time.strftime('%H:%M:%S')} · {len(views)} shim(s)")
    for col in ("pod", "mode", "shim pid", "tasks", "execs", "shim RSS", "shim PSS", "VM RSS", "CPU %", "up"):
        table.add_column(col, justify="right" if col not in ("pod", "mode") else "left")
    for v in views:
        if v.tasks is None:
            table.add_row(v.shim.id[:24], "?", str(v.shim.pid), "-", "-", "-", "-", "-", "-", "not answering")
            continue
        pod, shim = v.tasks.pod, v.tasks.shim
        running = sum(1 for t in v.tasks.tasks if t.init.state == "running")
        execs = sum(len(t.execs) for t in v.tasks.tasks)
        name = f"{pod.namespace}/{pod.name}" if pod.name else pod.id[:24]
        rate = cpu_rates.get(v.shim.pid)
        table.add_row(
            name,
            MODE_NAMES.get(pod.isolation, pod.isolation),
            str(shim.pid),
            f"{running}/{len(v.tasks.tasks)}",
            str(execs),
            mib(shim.rss_bytes),
            mib(shim.pss_bytes),
            mib(shim.vm_rss_bytes),
            f"{rate * 100:.1f}" if rate is not None else "-",
            age(shim.started_at),
        )
    return table


def as_json(views: list[ShimView]) -> list[dict[str, Any]]:
    from google.protobuf.json_format import MessageToDict

    out = []
    for v in views:
        entry: dict[str, Any] = {
            "pid": v.shim.pid,
            "namespace": v.shim.namespace,
            "containerd_address": v.shim.containerd_address,
            "bundle": v.shim.bundle,
            "socket": v.shim.socket,
            "error": v.error,
        }
        if v.tasks is not None:
            entry.update(
                MessageToDict(
                    v.tasks, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
                )
            )
            shim = entry["shim"]
            for key in ("rss_bytes", "pss_bytes", "vm_rss_bytes", "vm_pss_bytes"):
                shim[key] = int(shim[key])  # proto3 JSON writes 64-bit integers as strings
        out.append(entry)
    return out
