"""Where podshim's CPU time goes, by py-spy (sampling, no change to the shim): the `start` and
`delete` actions (fake bundles, as in bench/actions.py), and a pod's server while containers
are created, started, stopped and removed in it through CRI.

Needs py-spy (a dev extra in pyproject.toml); without it the scenario records why it measured nothing.
Samples are on-CPU only (py-spy's default), so the figures are shares of the shim's own CPU.
"""

from __future__ import annotations

import collections
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.actions import FakeBundle, Variant, find_server, make_bundle, shutdown
from bench.env import PODSHIM, PYTHON_ENTRY, RUNTIMES, Env, shim_env
from bench.pods import SLEEPER, log_path, remove_pod, start_pod, wait_output
from bench.procs import shim_pid
from bench.stats import ScenarioResult

NAME = "profile"
TITLE = "Profiles of podshim (py-spy): actions and the server under container churn"
RATE = 1000  # samples per second


def py_spy() -> str | None:
    found = Path(sys.executable).with_name("py-spy")
    return str(found) if found.exists() else shutil.which("py-spy")


def run(env: Env, actions: int = 10, churn: int = 10) -> ScenarioResult:
    res = ScenarioResult(NAME, TITLE)
    spy = py_spy()
    if spy is None:
        res.notes.append("py-spy is not installed (scripts/setup.sh installs it): no profiles")
        return res
    out = env.scratch / "profiles"
    out.mkdir(parents=True, exist_ok=True)
    podshim = Variant.of(RUNTIMES[PODSHIM])
    # py-spy runs the interpreter itself, on the Python entry point: these are the cold actions
    # (a zygote's worker runs the same code, without the interpreter start and the imports).
    script = str(PYTHON_ENTRY)
    stacks: dict[str, collections.Counter[str]] = {
        "start": collections.Counter(),
        "delete": collections.Counter(),
    }
    ids = itertools.count()
    skipped = 0
    for _ in range(actions):
        i = next(ids)
        b = make_bundle(env, f"prof-{i}")
        try:
            proc = _record(spy, script, env, b, out / f"start-{i}.txt", "start")
            # From the bundle, not stdout: py-spy prints there too, right after the address.
            address_file = b.path / "address"
            if not address_file.exists():
                raise RuntimeError(f"start under py-spy failed: {proc.stdout!r} {proc.stderr!r}")
            # The action worked: its server must go whether or not py-spy got its samples.
            shutdown(address_file.read_text(), b, find_server(podshim.basename, b.task_id))
            # py-spy can lose the race with a process this short (it exits before py-spy has
            # read its interpreter state): a missing sample, not a shim failure.
            skipped += proc.returncode != 0
            _load(out / f"start-{i}.txt", stacks["start"])
            skipped += _record(spy, script, env, b, out / f"delete-{i}.txt", "delete").returncode != 0
            _load(out / f"delete-{i}.txt", stacks["delete"])
        finally:
            b.drain_log()
            b.remove()
    if skipped:
        res.notes.append(f"py-spy failed to record {skipped} of {2 * actions} actions (too short-lived)")

    # The server: attach to a pod's shim, then churn containers through it.
    pod, _ = start_pod(env, PODSHIM, "profile")
    stacks["server"] = collections.Counter()
    try:
        pid = shim_pid(RUNTIMES[PODSHIM].binary, pod.id)
        target = out / "server.txt"
        rec = subprocess.Popen(
            [
                spy,
                "record",
                "-r",
                str(RATE),
                "-f",
                "raw",
                "-o",
                str(target),
                "--nonblocking",
                "--pid",
                str(pid),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # py-spy attaches
        t0 = time.perf_counter()
        for i in range(churn):
            name = f"churn{i}"
            cid = env.cri.run_container(pod, name, SLEEPER, image=env.image)
            wait_output(log_path(pod, name), "ready")
            env.cri.exec_sync(cid, ["true"])
            env.cri.stop_container(cid, 0)
            env.cri.remove_container(cid)
        churn_s = time.perf_counter() - t0
        rec.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        rec.wait(timeout=30)
        _load(target, stacks["server"])
        res.details["server_churn_seconds"] = churn_s
    finally:
        remove_pod(env, pod)

    for what, counter in stacks.items():
        total = sum(counter.values())
        res.details[f"{what}_samples"] = total
        if not total:
            continue
        per = {"start": actions, "delete": max(1, actions - skipped), "server": churn}[what]
        ms = 1000 / RATE / per  # ms of CPU per action (or per churned container) for one sample
        leaf = _by(counter, lambda frames: frames[-1:])
        ours = _by(
            counter, lambda frames: [f for f in frames if "podshim/" in f and "/site-packages/" not in f]
        )
        res.tables[f"py-spy `{what}`: top functions, self ({total} samples; ms per run)"] = (
            ["function", "self", "share"],
            [[f"`{f[:110]}`", f"{n * ms:.1f}", f"{100 * n / total:.0f}%"] for f, n in leaf.most_common(12)],
        )
        res.tables[f"py-spy `{what}`: podshim functions, inclusive (ms per run)"] = (
            ["function", "inclusive", "share"],
            [[f"`{f[:110]}`", f"{n * ms:.1f}", f"{100 * n / total:.0f}%"] for f, n in ours.most_common(12)],
        )
    return res


def _action_args(env: Env, task_id: str, namespace: str, bundle: Path, action: str) -> list[str]:
    args = [
        "-namespace",
        namespace,
        "-address",
        env.cd.address,
        "-publish-binary",
        "containerd",
        "-id",
        task_id,
    ]
    if action == "delete":
        args += ["-bundle", str(bundle)]
    return [*args, action]


def _record(
    spy: str, script: str, env: Env, b: FakeBundle, samples: Path, action: str
) -> subprocess.CompletedProcess[bytes]:
    """Run one shim action in bundle ``b`` under py-spy, its samples going to ``samples``."""
    argv = [spy, "record", "-r", str(RATE), "-f", "raw", "-o", str(samples), "--nonblocking", "--",
            sys.executable, script, *_action_args(env, b.task_id, b.namespace, b.path, action)]  # fmt: skip
    return subprocess.run(argv, cwd=b.path, env=shim_env(env.cd), stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=60, check=False)  # fmt: skip


def _load(path: Path, counter: collections.Counter[str]) -> None:
    """py-spy's raw format: `frame;frame;…;leaf count` per line, outermost frame first."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counter[stack] += int(n)
    os.unlink(path)


def _by(
    counter: collections.Counter[str], pick: Callable[[list[str]], list[str]]
) -> collections.Counter[str]:
    """Samples per frame that `pick` selects from each stack (each frame counted once per stack)."""
    out: collections.Counter[str] = collections.Counter()
    for stack, n in counter.items():
        for f in {_short(f) for f in pick(stack.split(";"))}:
            out[f] += n
    return out


def _short(frame: str) -> str:
    # "func (path/to/module.py:123)" → "func (module.py)": lines split one function's samples.
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    return f"{name} ({'/'.join(file.split('/')[-2:])})"
