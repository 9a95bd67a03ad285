"""What observability costs each shim (issue "See inside", so that it does not undo "warm start"):

* memory: a pod's shim before any Diag request, after its first Diag.Tasks + Diag.Metrics (the Diag
  service loads lazily, at the first request), and after a further run of scrapes;
* time per State request: the ttrpc server with the request observer (the counters and latency
  histogram every shim keeps) against the same server without it, over a real unix socket, in a
  server thread of this process; same State handler, interleaved rounds.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
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
from podshim.shim.telemetry import Telemetry
from podshim.ttrpc.server import Method, Server

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


class _ServerThread:
    """A ttrpc server with one State method, on its own loop in a thread."""

    def __init__(self, path: str, observed: bool) -> None:
        telemetry = Telemetry()

        async def state(req: Any, ctx: Any) -> task_pb2.StateResponse:
            return task_pb2.StateResponse(id=req.id, pid=1, status=2)

        self.server = Server(
            {"containerd.task.v2.Task": {"State": Method(task_pb2.StateRequest, state)}},
            observer=telemetry.request_done if observed else None,
        )
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.loop.run_until_complete(self.server.serve(self.sock))

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.thread.join(10)
        self.loop.close()


def state_cost(calls: int = 2000, rounds: int = 5) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"with observer": [], "without": []}
    with tempfile.TemporaryDirectory(prefix="podshim-diagcost-") as d:
        servers = {
            label: _ServerThread(str(Path(d) / f"{i}.sock"), label == "with observer")
            for i, label in enumerate(out)
        }
        try:
            for _ in range(rounds):
                for i, label in enumerate(out):
                    path = str(Path(d) / f"{i}.sock")
                    out[label].extend(
                        latencies(path, "State", task_pb2.StateRequest(id="x"), calls // rounds)
                    )
        finally:
            for s in servers.values():
                s.close()
    return out


def report(binary: str, pods: list[Pod]) -> tuple[dict[str, Any], tuple[list[str], list[list[str]]]]:
    mem = memory_cost(binary, pods)
    lat = state_cost()
    med = {k: Summary.of(v).median for k, v in lat.items()}
    rows = [
        ["shim RSS before any Diag request", f"{Summary.of(mem['before']).median / 1024:.1f} MiB"],
        ["+ first Diag request (loads the Diag service)", f"{Summary.of(mem['first']).median:+.0f} KiB"],
        [f"+ {SCRAPES} more scrapes (Tasks + Metrics)", f"{Summary.of(mem['scrapes']).median:+.0f} KiB"],
        ["State round trip, server without the request observer", f"{med['without'] * 1e6:.1f} µs"],
        ["State round trip, server with the request observer", f"{med['with observer'] * 1e6:.1f} µs"],
        ["observer cost per State request", f"{(med['with observer'] - med['without']) * 1e6:+.1f} µs"],
    ]
    details = {"memory_kib": mem, "state_seconds": {k: Summary.of(v).to_json() for k, v in lat.items()}}
    return details, (["what", "median"], rows)
