"""Scenario 4, memory: the shim per pod with 1 and with 3 containers, the interpreter's baseline,
and what the shim imports (time and memory per module), so that we know what to trim.

PODS pods per runtime are alive together (started A B A B), as on a node: PSS then shares the
interpreter's and libraries' pages among them, which is what the node really pays per pod.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any

from cri.client import Pod

from bench import diagcost, whatif
from bench.actions import Variant, cycle, group_of, importtime_profile, pyc_copy, warm_actions_zygote
from bench.env import PODSHIM, RUNC, RUNTIMES, Env
from bench.pods import add_containers, remove_pod, start_pod
from bench.procs import Memory, fd_count, forked_from_zygote, settle, shim_pid, thread_count
from bench.stats import ScenarioResult, Summary

NAME = "memory"
TITLE = "Memory: shim RSS / PSS per pod, baseline, imports"

# Run in a fresh interpreter: import the shim's modules in layers, and after each layer read RSS
# and the time it took. The order follows the dependencies, so each step adds only its own cost.
IMPORT_STEPS = (
    "os, sys, json, argparse",
    "socket, subprocess",
    "hashlib",  # OpenSSL's libcrypto, for one sha256 of the socket path
    "logging",
    "ssl",  # asyncio imports it (sslproto); a unix-socket shim never uses it
    "asyncio",
    "google.protobuf.message",
    "podshim.api.task_pb2",
    "podshim.ttrpc.server, podshim.ttrpc.client",
    "podshim.options, podshim.oci",
    "ctypes",
    "podshim.system.stdio, podshim.system.mounts, podshim.system.cgroups, podshim.system.reaper",
    "podshim.backends.runc.backend",
    "podshim.service",
    "podshim.shim.main, podshim.shim.daemon",
)
_PROBE = """
import json, sys, time
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4
steps = json.loads(sys.argv[1])
out = [("(interpreter)", rss(), 0.0, len(sys.modules))]
for step in steps:
    t0 = time.perf_counter()
    exec("import " + step)
    out.append((step, rss(), time.perf_counter() - t0, len(sys.modules)))
print(json.dumps(out))
"""


def _python() -> str:
    return sys.executable


def run(env: Env, pods: int = 3, reps: int = 5) -> ScenarioResult:
    res = ScenarioResult(NAME, TITLE)
    order = env.compared
    live: dict[str, list[Pod]] = {rt: [] for rt in order}
    env.warm_zygote()
    warm_actions_zygote(env)
    try:
        for i in range(pods):
            for rt in order:
                pod, _ = start_pod(env, rt, f"mem-{rt}-{i}")
                live[rt].append(pod)
        mem1 = _measure(live, res.notes)
        for rt in order:
            for pod in live[rt]:
                add_containers(env, pod, 2)
        mem3 = _measure(live, res.notes)
        # What metrics cost per shim (after mem3: the first Diag request loads the Diag service).
        res.details["diag_cost"], res.tables["What observability costs per shim (Diag, metrics)"] = (
            diagcost.report(RUNTIMES[PODSHIM].binary, live[PODSHIM])
        )
    finally:
        for rt in order:
            for pod in live[rt]:
                remove_pod(env, pod)
    for label, mem in (("1 container", mem1), ("3 containers", mem3)):
        res.row(
            f"shim RSS per pod, {label}",
            "KiB",
            {rt: [m.rss for m in ms] for rt, ms in mem.items()},
            target=1.5,
        )
        res.row(f"shim PSS per pod, {label}", "KiB", {rt: [m.pss for m in ms] for rt, ms in mem.items()})
        res.row(f"shim USS per pod, {label}", "KiB", {rt: [m.uss for m in ms] for rt, ms in mem.items()})
    growth = {rt: [b.rss - a.rss for a, b in zip(mem1[rt], mem3[rt], strict=True)] for rt in order}
    res.details["rss_per_extra_2_containers_kib"] = {rt: Summary.of(v).to_json() for rt, v in growth.items()}

    # Baseline: a server right after `start`, before any Create (both shims), a few times.
    base: dict[str, list[Memory]] = defaultdict(list)
    for i in range(max(1, reps // 2)):
        for rt in order:
            c = cycle(env, Variant.of(RUNTIMES[rt]), f"base-{rt}-{i}")
            assert c.baseline is not None
            base[rt].append(c.baseline)
    res.row(
        "server with no task (after start, before Create) RSS",
        "KiB",
        {rt: [m.rss for m in base[rt]] for rt in order},
    )
    res.row("server with no task PSS", "KiB", {rt: [m.pss for m in base[rt]] for rt in order})
    res.row("server with no task USS", "KiB", {rt: [m.uss for m in base[rt]] for rt in order})

    # What-if: servers forked from one warm interpreter (a zygote) instead of one each.
    zrows = []
    for freeze in (False, True):
        z = _zygote(env, freeze, count=max(2, pods))
        res.details[f"zygote_freeze_{freeze}"] = z
        kids = z["children"]
        zrows.append(
            [
                "forked from a zygote" + (", gc.freeze() first" if freeze else ""),
                f"{Summary.of([k['rss'] for k in kids]).median / 1024:.1f} MiB",
                f"{Summary.of([k['pss'] for k in kids]).median / 1024:.1f} MiB",
                f"{Summary.of([k['uss'] for k in kids]).median / 1024:.1f} MiB",
            ]
        )
    own = base[PODSHIM]
    zrows.insert(
        0,
        [
            "today: its own interpreter (`start` forks it)",
            f"{Summary.of([m.rss for m in own]).median / 1024:.1f} MiB",
            f"{Summary.of([m.pss for m in own]).median / 1024:.1f} MiB",
            f"{Summary.of([m.uss for m in own]).median / 1024:.1f} MiB",
        ],
    )
    res.tables["What-if: podshim servers with no task, each with its own interpreter or forked from one"] = (
        ["server", "RSS", "PSS", "USS (private)"],
        zrows,
    )

    # The interpreter alone, then the server's modules layer by layer (a proxy for the baseline).
    floor = _rss_of([_python(), "-c", "import time; time.sleep(0.3)"])
    layers = {}
    for label, extra in (("as installed", {}), ("with bytecode", pyc_copy(env.scratch / "pyc"))):
        proc = subprocess.run(
            [_python(), "-c", _PROBE, json.dumps(IMPORT_STEPS)],
            capture_output=True,
            text=True,
            check=True,
            cwd="/",
            env={**os.environ, **extra},
        )
        layers[label] = json.loads(proc.stdout)
    res.details["python_floor_rss_kib"] = floor
    res.details["import_layers"] = layers
    src, pyc = layers["as installed"], layers["with bytecode"]
    rows = []
    for i in range(1, len(src)):
        rows.append(
            [
                f"`{src[i][0]}`",
                f"{(src[i][1] - src[i - 1][1]) / 1024:+.2f} MiB",
                f"{src[i][2] * 1e3:.1f} ms",
                f"{pyc[i][2] * 1e3:.1f} ms",
                str(src[i][3] - src[i - 1][3]),
            ]
        )
    total_src, total_pyc = sum(x[2] for x in src), sum(x[2] for x in pyc)
    rows.append(
        [
            "total",
            f"{(src[-1][1] - src[0][1]) / 1024:+.2f} MiB",
            f"{total_src * 1e3:.1f} ms",
            f"{total_pyc * 1e3:.1f} ms",
            str(src[-1][3] - src[0][3]),
        ]
    )
    res.tables["What the server's imports cost, layer by layer (fresh interpreter, in this order)"] = (
        ["import", "RSS", "time", "time with bytecode", "modules"],
        rows,
    )
    res.tables["Baseline: the interpreter and the shim's servers with no task"] = (
        ["what", "RSS"],
        [
            ["`python -c sleep` (the interpreter floor)", f"{floor / 1024:.1f} MiB"],
            ["after importing the server's modules (proxy, above)", f"{src[-1][1] / 1024:.1f} MiB"],
            [
                "podshim server after `start`, no task (median)",
                f"{Summary.of([m.rss for m in base[PODSHIM]]).median / 1024:.1f} MiB",
            ],
            [
                "runc-v2 server after `start`, no task (median)",
                f"{Summary.of([m.rss for m in base[RUNC]]).median / 1024:.1f} MiB",
            ],
        ],
    )

    # -X importtime of the real actions: the start action (before the fork), the server (after
    # it, through the log FIFO), the delete action. Source as installed, and with bytecode.
    podshim = Variant.of(RUNTIMES[PODSHIM])
    prof = importtime_profile(env, podshim, reps)
    prof_pyc = importtime_profile(env, podshim, reps, pyc_copy(env.scratch / "pyc"))
    res.details["importtime"] = {"source": _jsonable(prof), "pyc": _jsonable(prof_pyc)}
    rows = []
    for phase in ("start", "server", "delete"):
        if not prof[phase]:
            continue  # the server imports nothing after the fork: start warmed everything
        total_src = sum(v[0] for v in prof[phase].values())
        total_pyc = sum(v[0] for v in prof_pyc[phase].values())
        rows.append([phase, f"{total_src / 1e3:.1f} ms", f"{total_pyc / 1e3:.1f} ms", str(len(prof[phase]))])
    res.tables["Import time per action (sum of self times, medians of runs)"] = (
        ["action", "as installed (no bytecode)", "with bytecode", "modules"],
        rows,
    )
    for phase in ("start", "delete"):
        groups: dict[str, int] = defaultdict(int)
        for m, v in prof[phase].items():
            groups[group_of(m)] += v[0]
        res.tables[f"`{phase}` action imports by group (self µs)"] = (
            ["group", "as installed", "with bytecode"],
            [
                [
                    g,
                    f"{v / 1e3:.1f} ms",
                    f"{sum(x[0] for m, x in prof_pyc[phase].items() if group_of(m) == g) / 1e3:.1f} ms",
                ]
                for g, v in sorted(groups.items(), key=lambda kv: -kv[1])
            ],
        )
        top = sorted(prof[phase].items(), key=lambda kv: -kv[1][0])[:15]
        res.tables[f"`{phase}` action: top imports by self time"] = (
            ["module", "self", "cumulative", "with bytecode (self)"],
            [
                [
                    m,
                    f"{v[0] / 1e3:.1f} ms",
                    f"{v[1] / 1e3:.1f} ms",
                    f"{prof_pyc[phase].get(m, (0, 0, 0))[0] / 1e3:.1f} ms",
                ]
                for m, v in top
            ],
        )
        tops = sorted(
            ((m, v) for m, v in prof[phase].items() if v[2] <= 1 or m.count(".") == 0),
            key=lambda kv: -kv[1][1],
        )[:12]
        res.tables[f"`{phase}` action: top-level imports by cumulative time"] = (
            ["module", "cumulative"],
            [[m, f"{v[1] / 1e3:.1f} ms"] for m, v in tops],
        )
    return res


def _measure(live: dict[str, list[Pod]], notes: list[str]) -> dict[str, list[Memory]]:
    settle(0.5)
    out: dict[str, list[Memory]] = {}
    for rt, pods in live.items():
        out[rt] = []
        for pod in pods:
            pid = shim_pid(RUNTIMES[rt].binary, pod.id)
            out[rt].append(Memory.of(pid))
            notes.append(
                f"memory: {rt} shim of pod {pod.name} with {len(pod.containers)} container(s): "
                f"{fd_count(pid)} fds, {thread_count(pid)} threads"
                + (", forked by the zygote" if forked_from_zygote(pid) else ", cold")
            )
    return out


def _zygote(env: Env, freeze: bool, count: int) -> dict[str, Any]:
    scratch = env.scratch / "zygote"
    scratch.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [_python(), "-c", whatif.ZYGOTE, str(scratch), "1" if freeze else "0", str(count)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd="/",
        env={**os.environ, **pyc_copy(env.scratch / "pyc")},
    )
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _rss_of(argv: list[str]) -> int:
    proc = subprocess.Popen(argv, cwd="/")
    time.sleep(0.15)
    rss = Memory.of(proc.pid).rss
    proc.wait()
    return rss


def _jsonable(prof: dict[str, dict[str, tuple[int, int, int]]]) -> dict[str, dict[str, list[int]]]:
    return {phase: {m: list(v) for m, v in mods.items()} for phase, mods in prof.items()}
