"""What observability costs each shim (issue "See inside", so that it does not undo "warm start"):

* memory: a pod's shim before any Diag request, after its first Diag.Tasks + Diag.Metrics (the Diag
  service loads lazily, at the first request), and after a further run of scrapes;
* time per State request: the ttrpc server with the request observer (the counters and latency
  histogram every shim keeps) against the same server without it, over a real unix socket, each
  in a process of its own; same State handler, interleaved rounds.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cri.client import Pod

from bench.procs import Memory, settle, shim_pid
from bench.stats import Summary
from bench.ttrpc_raw import latencies
from podshim.api import diag_pb2 as D
from podshim.api import task_pb2
from podshim.cli.diag import call
from podshim.cli.discovery import shim_process

SCRAPES = 50


def _scrape(pid: int, times: int) -> None:
    shim = shim_process(pid)
    assert shim is not None, f"pid {pid} is not a podshim server"

    async def go() -> None:
        for _ in range(times):
            await call(shim, "Tasks", D.TasksRequest(), D.TasksResponse)
            await call(shim, "Metrics", D.MetricsRequest(), D.MetricsResponse)

    asyncio.run(go())


def memory_cost(binary: str, pods: list[Pod]) -> dict[str, list[int]]:
    """KiB deltas per pod shim: first Diag request, then SCRAPES more."""
    out: dict[str, list[int]] = {"first": [], "scrapes": [], "before": []}
    for pod in pods:
        pid = shim_pid(binary, pod.id)
        before = Memory.of(pid)
        _scrape(pid, 1)
        settle(0.2)
        first = Memory.of(pid)
        _scrape(pid, SCRAPES)
        settle(0.2)
        after = Memory.of(pid)
        out["before"].append(before.rss)
        out["first"].append(first.rss - before.rss)
        out["scrapes"].append(after.rss - first.rss)
    return out


_SERVER = """
import asyncio, socket, sys
from podshim.api import task_pb2
from podshim.shim.telemetry import Telemetry
from podshim.ttrpc.server import Method, Server

async def state(req, ctx):
    return task_pb2.StateResponse(id=req.id, pid=1, status=2)

path, observed = sys.argv[1], sys.argv[2] == "1"
server = Server({"containerd.task.v2.Task": {"State": Method(task_pb2.StateRequest, state)}},
                observer=Telemetry().request_done if observed else None)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(path)
sock.listen(16)
sock.setblocking(False)
print("ready", flush=True)
asyncio.run(server.serve(sock))
"""


class _ServerProcess:
    """A ttrpc server with one State method, in a process of its own (as a shim's is: a server
    thread in this process would measure the GIL's hand-offs, not the server)."""

    def __init__(self, path: str, observed: bool) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, path, "1" if observed else "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _cpu_seconds(pid: int) -> float:
    """Time on a CPU in ns precision (/proc/<pid>/schedstat), not in clock ticks."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def state_cost(calls: int = 4000, rounds: int = 10) -> dict[str, dict[str, list[float]]]:
    """Per server: State round trips (seconds each) and server CPU seconds per request (one
    value per round).  The CPU is the figure to compare: a round trip on two shared cores moves
    by tens of µs with where and when the scheduler wakes the server."""
    labels = ("with observer", "without")
    out: dict[str, dict[str, list[float]]] = {k: {"round_trip": [], "cpu": []} for k in labels}
    with tempfile.TemporaryDirectory(prefix="podshim-diagcost-") as d:
        servers = {
            label: _ServerProcess(str(Path(d) / f"{i}.sock"), label == labels[0])
            for i, label in enumerate(labels)
        }
        try:
            for r in range(rounds):
                order = list(enumerate(labels))
                for i, label in order if r % 2 == 0 else reversed(order):
                    pid = servers[label].proc.pid
                    cpu0 = _cpu_seconds(pid)
                    lat = latencies(
                        str(Path(d) / f"{i}.sock"), "State", task_pb2.StateRequest(id="x"), calls // rounds
                    )
                    out[label]["cpu"].append((_cpu_seconds(pid) - cpu0) / len(lat))
                    out[label]["round_trip"].extend(lat)
        finally:
            for s in servers.values():
                s.close()
    return out


def observer_seconds(calls: int = 200_000) -> float:
    """What the counters and histogram cost per request: the observer called directly.  The
    servers' CPU per request (``state_cost``) cannot resolve it: two processes on two shared
    cores vary by more than it from round to round."""
    import timeit

    from podshim.shim.telemetry import Telemetry

    t = Telemetry()
    return (
        timeit.timeit(lambda: t.request_done("containerd.task.v2.Task", "State", 0, 4e-5), number=calls)
        / calls
    )


def report(binary: str, pods: list[Pod]) -> tuple[dict[str, Any], tuple[list[str], list[list[str]]]]:
    mem = memory_cost(binary, pods)
    lat = state_cost()
    observer = observer_seconds()
    rt = {k: Summary.of(v["round_trip"]).median for k, v in lat.items()}
    cpu = {k: Summary.of(v["cpu"]).median for k, v in lat.items()}
    rows = [
        ["shim RSS before any Diag request", f"{Summary.of(mem['before']).median / 1024:.1f} MiB"],
        ["+ first Diag request (loads the Diag service)", f"{Summary.of(mem['first']).median:+.0f} KiB"],
        [f"+ {SCRAPES} more scrapes (Tasks + Metrics)", f"{Summary.of(mem['scrapes']).median:+.0f} KiB"],
        ["the request observer alone, per request (timed in-process)", f"{observer * 1e6:.2f} µs"],
        ["server CPU per State request, without the request observer", f"{cpu['without'] * 1e6:.1f} µs"],
        ["server CPU per State request, with the request observer", f"{cpu['with observer'] * 1e6:.1f} µs"],
        [
            "State round trip without / with the observer (scheduler-bound)",
            f"{rt['without'] * 1e6:.1f} / {rt['with observer'] * 1e6:.1f} µs",
        ],
    ]
    details = {
        "memory_kib": mem,
        "observer_seconds": observer,
        "state_round_trip_seconds": {k: Summary.of(v["round_trip"]).to_json() for k, v in lat.items()},
        "state_cpu_seconds": {k: Summary.of(v["cpu"]).to_json() for k, v in lat.items()},
    }
    return details, (["what", "median"], rows)
