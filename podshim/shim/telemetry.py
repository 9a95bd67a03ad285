"""The figures every shim keeps for ``Diag.Metrics``: plain counters and fixed-bucket histograms.

Not prometheus_client: every pod pays for what each shim imports, and the shim only needs to
count.  ``podshim monitor`` (one per node) pulls these over Diag and serves them to Prometheus.
Recording is a dict update and a ``bisect``; everything else (memory, fds, per-state counts) is
read when a scrape asks for it.
"""

from __future__ import annotations

import time
from bisect import bisect_left

# Seconds; the last bucket is +Inf.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
KEEP_LIFECYCLES = 1024  # containers and execs whose create/start/exit times are remembered


class Histogram:
    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[int]:
        out, total = [], 0
        for c in self.counts:
            total += c
            out.append(total)
        return out


class Lifecycle:
    """When one container (or exec) was created, started and first exited (unix times)."""

    __slots__ = ("created", "exited", "started")

    def __init__(self, created: float = 0.0) -> None:
        self.created = created
        self.started = 0.0
        self.exited = 0.0


class Telemetry:
    def __init__(self) -> None:
        self.started_at = time.time()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[tuple[str, str], Histogram] = {}
        self.events = {"published": 0, "retried": 0, "dropped": 0}
        self.agent_latency: dict[str, Histogram] = {}
        self.lifecycles: dict[tuple[str, str], Lifecycle] = {}
        self.create_to_start = Histogram()
        self.start_to_exit = Histogram((0.1, 1.0, 10.0, 60.0, 600.0, 3600.0, 86400.0))

    # -- the ttrpc server ----------------------------------------------------------------------

    def request_done(self, service: str, method: str, code: int, seconds: float) -> None:
        key = (service, method, code)
        self.requests[key] = self.requests.get(key, 0) + 1
        h = self.latency.get((service, method))
        if h is None:
            h = self.latency[(service, method)] = Histogram()
        h.observe(seconds)

    # -- events --------------------------------------------------------------------------------

    def event(self, outcome: str) -> None:
        self.events[outcome] += 1

    def task_event(self, topic: str, container_id: str, exec_id: str = "") -> None:
        """Lifecycle times, from the task events the shim publishes anyway."""
        now = time.time()
        key = (container_id, exec_id)
        if topic in ("/tasks/create", "/tasks/exec-added"):
            self.lifecycles[key] = Lifecycle(now)
            while len(self.lifecycles) > KEEP_LIFECYCLES:
                del self.lifecycles[next(iter(self.lifecycles))]
            return
        lc = self.lifecycles.get(key)
        if lc is None:
            return
        if topic in ("/tasks/start", "/tasks/exec-started"):
            lc.started = now
            if not exec_id:
                self.create_to_start.observe(now - lc.created)
        elif topic == "/tasks/exit" and not lc.exited:
            lc.exited = now
            if not exec_id and lc.started:
                self.start_to_exit.observe(now - lc.started)
        elif topic == "/tasks/delete":
            for k in [k for k in self.lifecycles if k[0] == container_id]:
                del self.lifecycles[k]

    # -- the VM agent ---------------------------------------------------------------------------

    def agent_call(self, op: str, seconds: float) -> None:
        h = self.agent_latency.get(op)
        if h is None:
            h = self.agent_latency[op] = Histogram()
        h.observe(seconds)


TELEMETRY = Telemetry()
"""The shim's one instance: the server, the publisher and the VM client record into it."""
