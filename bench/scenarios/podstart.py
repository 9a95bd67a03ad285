"""Scenario 2, pod start via CRI: RunPodSandbox, create and start the containers, first output.

With 1 container and with 3 per pod, A B A B. Each pod is removed (untimed for the start
figures, timed as its own row) before the next one starts, so the runs do not overlap.
"""

from __future__ import annotations

import itertools

from bench.env import Env
from bench.pods import remove_pod, start_pod
from bench.stats import ScenarioResult, interleave

NAME = "podstart"
TITLE = "Pod start via CRI (RunPodSandbox → containers started → first output)"


def run(env: Env, iterations: int = 10, warmup: int = 1) -> ScenarioResult:
    res = ScenarioResult(NAME, TITLE)
    ids = itertools.count()
    for containers in (1, 3):
        parts: dict[str, dict[str, list[float]]] = {}
        teardown: dict[str, list[float]] = {}

        def one(
            runtime: str,
            i: int,
            containers: int = containers,
            parts: dict[str, dict[str, list[float]]] = parts,
            teardown: dict[str, list[float]] = teardown,
        ) -> float:
            pod, t = start_pod(env, runtime, f"start{containers}-{next(ids)}", containers)
            gone = remove_pod(env, pod)
            if i >= 0:
                p = parts.setdefault(runtime, {"RunPodSandbox": [], "containers": [], "output": []})
                p["RunPodSandbox"].append(t.run_pod)
                p["containers"].append(t.containers)
                p["output"].append(t.first_output)
                teardown.setdefault(runtime, []).append(gone)
            return t.total

        env.warm_zygote()
        totals = interleave(one, iterations=iterations, warmup=warmup, order=env.compared)
        res.row(f"pod start, {containers} container(s), to first output", "s", totals, target=1.10)
        res.row(
            f"  of which RunPodSandbox ({containers}c run)",
            "s",
            {rt: p["RunPodSandbox"] for rt, p in parts.items()},
        )
        res.row(
            f"  of which Create+StartContainer x{containers}",
            "s",
            {rt: p["containers"] for rt, p in parts.items()},
        )
        res.row(f"pod stop + remove, {containers} container(s)", "s", teardown)
    return res
