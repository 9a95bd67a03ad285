"""Scenario 6, exec storm: CALLS ExecSync calls into one pod's container, A B A B call by call.

Both pods stay up throughout; each shim's descriptors, threads and RSS are read after a short
warm-up (the allocator's first growth is not a leak) and again after the storm.
"""

from __future__ import annotations

import time

from cri.client import Pod

from bench.env import ORDER, RUNTIMES, Env
from bench.pods import remove_pod, start_pod
from bench.procs import Memory, fd_count, settle, shim_pid, thread_count
from bench.stats import ScenarioResult, interleave

NAME = "exec"
TITLE = "Exec storm: ExecSync into one pod"
WARMUP = 10


def run(env: Env, calls: int = 200) -> ScenarioResult:
    res = ScenarioResult(NAME, TITLE)
    pods: dict[str, Pod] = {}
    try:
        targets: dict[str, str] = {}
        for rt in ORDER:
            pod, t = start_pod(env, rt, f"exec-{rt}")
            pods[rt] = pod
            targets[rt] = t.container_ids[0]

        def one(rt: str, i: int) -> float:
            t0 = time.perf_counter()
            out = env.cri.exec_sync(targets[rt], ["echo", "x"])
            elapsed = time.perf_counter() - t0
            if out.exit_code != 0 or out.stdout != "x\n":
                raise RuntimeError(f"ExecSync on {rt} returned {out}")
            return elapsed

        interleave(one, iterations=0, warmup=min(WARMUP, calls))
        before = _observe(pods)
        lat = interleave(one, iterations=calls, warmup=0)
        after = _observe(pods)
        res.row("ExecSync latency", "s", lat)
        header = [
            "runtime",
            "fds before",
            "fds after",
            "threads before",
            "after",
            "RSS before",
            "RSS after",
            "growth",
        ]
        rows = []
        for rt in ORDER:
            b, a = before[rt], after[rt]
            rows.append(
                [
                    rt,
                    str(b[0]),
                    str(a[0]),
                    str(b[1]),
                    str(a[1]),
                    f"{b[2].rss / 1024:.1f} MiB",
                    f"{a[2].rss / 1024:.1f} MiB",
                    f"{(a[2].rss - b[2].rss):+d} KiB",
                ]  # fmt: skip
            )
            res.details[rt] = {
                "fds": [b[0], a[0]],
                "threads": [b[1], a[1]],
                "rss_kib": [b[2].rss, a[2].rss],
                "pss_kib": [b[2].pss, a[2].pss],
            }
            if a[0] > b[0]:
                res.notes.append(f"{rt}: descriptor count grew from {b[0]} to {a[0]} over {calls} execs")
        res.tables[f"Shim resources around {calls} ExecSync calls (after {WARMUP} warm-up calls)"] = (
            header,
            rows,
        )
    finally:
        for pod in pods.values():
            remove_pod(env, pod)
    return res


def _observe(pods: dict[str, Pod]) -> dict[str, tuple[int, int, Memory]]:
    settle(0.5)
    out = {}
    for rt, pod in pods.items():
        pid = shim_pid(RUNTIMES[rt].binary, pod.id)
        out[rt] = (fd_count(pid), thread_count(pid), Memory.of(pid))
    return out
