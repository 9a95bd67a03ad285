"""``podshim monitor``: one Prometheus exporter per node.

On every scrape it finds the shims (as ``podshim ps`` does), pulls each one's ``Diag.Metrics``
and ``Diag.Tasks`` concurrently, and serves them with ``pod``, ``namespace``, ``uid`` (CRI's),
``container`` and ``isolation`` labels.  No shim runs an HTTP listener or imports
prometheus_client.  A shim that does not answer within the scrape timeout is ``podshim_up 0``;
the scrape itself never fails for it.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from podshim.api import diag_pb2 as D
from podshim.cli.diag import DiagUnavailable, call
from podshim.cli.discovery import ShimProcess, find_shims
from podshim.errdefs import ShimError

DEFAULT_LISTEN = "127.0.0.1:9309"
DEFAULT_TIMEOUT = 2.0
POD_LABELS = ("pod", "namespace", "uid", "pod_id", "isolation", "containerd_namespace", "shim_pid")


class Scrape:
    """One shim's answers for one scrape."""

    def __init__(self, shim: ShimProcess, known: D.PodInfo | None = None) -> None:
        self.shim = shim
        self.known = known  # what the shim said at an earlier scrape, for a shim that is silent now
        self.tasks: D.TasksResponse | None = None
        self.metrics: D.MetricsResponse | None = None
        self.error = ""
        self.seconds = 0.0

    def pod_labels(self) -> dict[str, str]:
        pod = self.tasks.pod if self.tasks is not None else self.known or D.PodInfo(id=self.shim.id)
        return {
            "pod": pod.name,
            "namespace": pod.namespace,
            "uid": pod.uid,
            "pod_id": pod.id or self.shim.id,
            "isolation": pod.isolation,
            "containerd_namespace": self.shim.namespace,
            "shim_pid": str(self.shim.pid),
        }


async def scrape_all(
    shims: list[ShimProcess], timeout: float, known: dict[int, D.PodInfo] | None = None
) -> list[Scrape]:
    known = {} if known is None else known

    async def one(shim: ShimProcess) -> Scrape:
        s = Scrape(shim, known.get(shim.pid))
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                s.tasks, s.metrics = await asyncio.gather(
                    call(shim, "Tasks", D.TasksRequest(), D.TasksResponse, timeout),
                    call(shim, "Metrics", D.MetricsRequest(), D.MetricsResponse, timeout),
                )
        except (DiagUnavailable, ShimError, TimeoutError, OSError) as e:
            s.tasks = s.metrics = None
            s.error = str(e) or "timed out"
        s.seconds = time.monotonic() - t0
        if s.tasks is not None:
            known[shim.pid] = s.tasks.pod
        return s

    scrapes = list(await asyncio.gather(*(one(s) for s in shims)))
    for pid in set(known) - {s.pid for s in shims}:
        del known[pid]  # gone: forget it
    return scrapes


def families(scrapes: list[Scrape]) -> list[Metric]:
    up = GaugeMetricFamily(
        "podshim_up", "1 if the shim answered Diag within the scrape timeout", labels=POD_LABELS
    )
    took = GaugeMetricFamily(
        "podshim_scrape_duration_seconds", "how long the shim took to answer this scrape", labels=POD_LABELS
    )
    out: dict[str, Metric] = {}
    for s in scrapes:
        labels = s.pod_labels()
        values = [labels[k] for k in POD_LABELS]
        up.add_metric(values, 0.0 if s.metrics is None else 1.0)
        took.add_metric(values, s.seconds)
        if s.metrics is None:
            continue
        for fam in s.metrics.families:
            _add_family(out, fam, labels)
    return [up, took, *out.values()]


def _add_family(out: dict[str, Metric], fam: D.MetricFamily, pod: dict[str, str]) -> None:
    """Samples go in with whatever labels they carry (plus the pod's): shims need not agree on a
    family's label names, and pod-level series get no empty ``container`` label."""
    metric = out.get(fam.name)
    if metric is None:
        kind = fam.type if fam.type in ("counter", "gauge", "histogram") else "untyped"
        metric = out[fam.name] = Metric(fam.name.removesuffix("_total") if kind == "counter" else fam.name,
                                        fam.help, kind)  # fmt: skip
    for smp in fam.samples:
        labels = {**dict(smp.labels), **pod}
        if fam.type == "counter":
            metric.add_sample(metric.name + "_total", labels, smp.value)
        elif fam.type == "histogram":
            for bound, count in zip(smp.bucket_bounds, smp.bucket_counts, strict=True):
                le = "+Inf" if math.isinf(bound) else repr(bound)
                metric.add_sample(fam.name + "_bucket", {**labels, "le": le}, float(count))
            metric.add_sample(fam.name + "_count", labels, float(smp.count))
            metric.add_sample(fam.name + "_sum", labels, smp.value)
        else:
            metric.add_sample(fam.name, labels, smp.value)


class ShimCollector(Collector):
    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()  # one scrape at a time: each opens a connection per shim
        self._known: dict[int, D.PodInfo] = {}

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            scrapes = asyncio.run(scrape_all(find_shims(), self.timeout, self._known))
        yield from families(scrapes)


def serve(listen: str, timeout: float) -> tuple[Any, threading.Thread]:
    from prometheus_client import start_http_server
    from prometheus_client.registry import CollectorRegistry

    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ShimCollector(timeout))
    return start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=registry)
