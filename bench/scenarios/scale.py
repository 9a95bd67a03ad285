"""Scenario 5, scale: N pods (pause + 1 sleeping container each) started with concurrency 4.

For each N, runc-v2 then podshim: all N pods are started through a pool of 4 CRI callers, the
shims' memory is read while all of them run, then every pod is stopped and removed (also 4 at a
time) and the bench waits for the shims to be gone before the next round.

"Cost per pod" is the wall time divided by N, and the summed shim memory divided by N. With 4
callers, N=1 cannot overlap anything, so its time per pod is a single pod's latency; flatness
is judged from N=10 up (and memory over every N).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc  # type: ignore[import-untyped]
from cri.client import Pod
from cri.harness import shim_servers

from bench.env import PODSHIM, RUNTIMES, Env
from bench.pods import remove_pod, start_pod
from bench.procs import Memory, forked_from_zygote, settle, shim_pid
from bench.stats import ScenarioResult, Summary

NAME = "scale"
TITLE = "Scale: N pods started with concurrency 4"
CONCURRENCY = 4


def run(env: Env, counts: tuple[int, ...] = (1, 10, 50, 100)) -> ScenarioResult:
    res = ScenarioResult(NAME, TITLE)
    order = env.compared
    series: dict[str, dict[int, dict[str, float]]] = {rt: {} for rt in order}
    env.warm_zygote()
    for n in counts:
        for rt in order:
            series[rt][n] = _one(env, rt, n, res.notes)
    res.details["series"] = {rt: {str(n): v for n, v in s.items()} for rt, s in series.items()}
    header = ["pods", "runtime", "total", "time/pod", "pod start p50", "p90", "shim RSS total", "PSS total",
              "PSS/pod", "teardown/pod", "servers forked by the zygote"]  # fmt: skip
    rows = []
    for n in counts:
        for rt in order:
            v = series[rt][n]
            rows.append(
                [
                    str(n),
                    rt,
                    f"{v['total_s']:.2f} s",
                    f"{v['per_pod_s'] * 1e3:.0f} ms",
                    f"{v['latency_p50_s'] * 1e3:.0f} ms",
                    f"{v['latency_p90_s'] * 1e3:.0f} ms",
                    f"{v['rss_total_kib'] / 1024:.0f} MiB",
                    f"{v['pss_total_kib'] / 1024:.0f} MiB",
                    f"{v['pss_per_pod_kib'] / 1024:.1f} MiB",
                    f"{v['teardown_per_pod_s'] * 1e3:.0f} ms",
                    f"{v['forked_from_zygote']:.0f}/{n}" if rt == PODSHIM else "",
                ]  # fmt: skip
            )
    res.tables["Scale (concurrency 4)"] = (header, rows)
    flat_from = [n for n in counts if n >= 10] or list(counts)
    for rt in order:
        per_pod = [series[rt][n]["per_pod_s"] for n in flat_from]
        pss = [series[rt][n]["pss_per_pod_kib"] for n in counts]
        res.details.setdefault("flatness", {})[rt] = {
            "time_per_pod_max_over_min": max(per_pod) / min(per_pod),
            "pss_per_pod_max_over_min": max(pss) / min(pss),
            "counts_for_time": flat_from,
        }
    big = max(counts)
    res.row(
        f"time per pod at {big} pods",
        "s",
        {rt: [series[rt][big]["per_pod_s"]] for rt in order},
        target=1.2,
    )
    res.row(
        f"shim PSS per pod at {big} pods",
        "KiB",
        {rt: [series[rt][big]["pss_per_pod_kib"]] for rt in order},
        target=1.5,
    )
    res.row(
        f"shim RSS per pod at {big} pods",
        "KiB",
        {rt: [series[rt][big]["rss_total_kib"] / big] for rt in order},
        target=1.5,
    )
    res.row(
        "per-pod time, max/min over N≥10 (flat = ≤ 1.2)",
        "x",
        {rt: [res.details["flatness"][rt]["time_per_pod_max_over_min"]] for rt in order},
        note="each runtime's own flatness; the target applies to podshim's value, not to the ratio",
    )
    return res


def _one(env: Env, runtime: str, n: int, notes: list[str]) -> dict[str, float]:
    binary = RUNTIMES[runtime].binary
    latencies: list[float] = []
    pods: list[Pod] = []

    def start(i: int) -> None:
        pod, t = start_pod(env, runtime, f"scale{n}-{runtime}-{i}", 1, wait=False)
        pods.append(pod)
        latencies.append(t.total)

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(start, range(n)))
        total = time.perf_counter() - t0
        settle(1.0)
        pids = [shim_pid(binary, pod.id) for pod in pods]
        mems = [Memory.of(pid) for pid in pids]
        warm = sum(forked_from_zygote(pid) for pid in pids)
    finally:
        t1 = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(lambda p: _remove(env, runtime, p, notes), pods))
        teardown = time.perf_counter() - t1
        deadline = time.monotonic() + 60
        while any(shim_servers(binary, p.id) for p in pods) and time.monotonic() < deadline:
            time.sleep(0.1)
    lat = Summary.of(latencies)
    return {
        "total_s": total,
        "per_pod_s": total / n,
        "latency_p50_s": lat.median,
        "latency_p90_s": lat.p90,
        "rss_total_kib": float(sum(m.rss for m in mems)),
        "pss_total_kib": float(sum(m.pss for m in mems)),
        "pss_per_pod_kib": sum(m.pss for m in mems) / n,
        "teardown_s": teardown,
        "teardown_per_pod_s": teardown / n,
        "forked_from_zygote": float(warm),
    }


def _remove(env: Env, runtime: str, pod: Pod, notes: list[str]) -> None:
    """Stop and remove; a failure is recorded (it is a finding) and retried once."""
    try:
        remove_pod(env, pod)
    except grpc.RpcError as e:
        notes.append(f"{runtime}: removing pod {pod.name} failed once: {e.code()} {e.details()}")
        time.sleep(1.0)
        remove_pod(env, pod)
