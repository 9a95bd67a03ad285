"""Scenario 1, container lifecycle: `ctr run --rm busybox true` end to end, and where the time goes.

Three measurements, each interleaved A B A B:

  * end to end, with containerd at log level info (at debug, podshim formats every request and
    reply as text: that is not what production pays);
  * the split, from one run at log level debug: containerd's own timestamps (snapshot mounts,
    the forwarded task events, "cleaning up dead shim") bound the same phases for both shims,
    and podshim's `-> Method` / `<- Method` lines give its time inside each RPC;
  * the `start` and `delete` actions alone (bench/actions.py), for both shims and for podshim's
    cold path, plus the server's memory right after `start` (no task yet).

podshim runs warm (its C entry point and zygote, made ready first) and, where the bench's
containerd has the podshim-cold runtime, cold too.

(bench/lifecycle.py, the script this scenario grew from, still runs it alone.)
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass
from datetime import datetime

from bench.actions import Variant, cycle, warm_actions_zygote
from bench.env import ORDER, PODSHIM, PODSHIM_COLD, PYTHON_ENTRY, RUNC, RUNTIMES, Env
from bench.stats import ScenarioResult, Summary, interleave

NAME = "lifecycle"
TITLE = "Container lifecycle: ctr run --rm busybox true"

_LINE = re.compile(r'^time=(?:"([^"]+)"|(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})) level=(\w+) msg=(.*)$')


def run_once(env: Env, runtime: str, cid: str) -> float:
    t0 = time.perf_counter()
    env.ctr.check("run", "--rm", "--runtime", RUNTIMES[runtime].runtime_type, env.image, cid, "true")
    return time.perf_counter() - t0


# -- the split, from containerd's debug log ----------------------------------------------------------


@dataclass(frozen=True)
class LogLine:
    t: float  # seconds since the epoch
    source: str  # "containerd", "podshim" or "runc-v2" (a shim's own lines, through the log FIFO)
    msg: str


def _parse_time(quoted: str | None, plain: str | None) -> float:
    if quoted is not None:
        # RFC 3339 with nanoseconds, UTC: keep microseconds, fromisoformat takes no more.
        head, _, frac = quoted.rstrip("Z").partition(".")
        return datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00").timestamp()
    assert plain is not None
    # Python logging's asctime: local time, milliseconds.
    return datetime.strptime(plain, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def parse_log(text: str) -> list[LogLine]:
    out: list[LogLine] = []
    for raw in text.splitlines():
        m = _LINE.match(raw)
        if not m:
            continue
        if m.group(1) is not None and "T" not in m.group(1):
            continue
        try:
            t = _parse_time(m.group(1), m.group(2))
        except ValueError:
            continue
        msg = m.group(4)
        if "runtime=io.containerd.podshim.v1" in raw and not msg.startswith('"cleanup warnings'):
            source = PODSHIM
        elif "runtime=io.containerd.runc.v2" in raw and not msg.startswith('"cleanup warnings'):
            source = RUNC
        else:
            source = "containerd"
        out.append(LogLine(t, source, msg))
    return out


# Phases bounded by containerd's clock, the same for both shims.
PHASES = (
    ("start action → server up", "mounts", "up"),
    ("server up → TaskCreate (Create RPC, runc create)", "up", "/tasks/create"),
    ("TaskCreate → TaskStart (Start RPC)", "/tasks/create", "/tasks/start"),
    ("TaskStart → TaskExit (true runs)", "/tasks/start", "/tasks/exit"),
    ("TaskExit → TaskDelete (Wait, Delete RPC)", "/tasks/exit", "/tasks/delete"),
    ("TaskDelete → shim gone (Shutdown)", "/tasks/delete", "cleanup"),
    ("delete action (→ ctr's next call)", "cleanup", "remove snapshot"),
    ("container removed", "remove snapshot", "/containers/delete"),
)
# podshim's own view of its RPCs: "-> X" to "<- X".
SHIM_RPCS = ("Create", "Start", "Delete")


def split_marks(lines: list[LogLine], shim: str) -> dict[str, float]:
    """The marks of one `ctr run --rm` in a log segment that holds only that run."""
    marks: dict[str, float] = {}
    for ln in lines:
        msg = ln.msg
        if ln.source == shim and "up" not in marks:
            marks["up"] = ln.t
        if ln.source == "containerd":
            if msg.startswith('"get snapshot mounts"') and "up" not in marks:
                marks["mounts"] = ln.t  # the last one before the shim's first line: NewTask's
            elif msg.startswith('"event forwarded"') or msg.startswith('"event published"'):
                topic = re.search(r"topic=(\S+)", msg)
                if topic and topic.group(1) not in marks:
                    marks[topic.group(1)] = ln.t
            elif msg.startswith('"cleaning up dead shim"') and "cleanup" not in marks:
                marks["cleanup"] = ln.t
            elif (
                msg.startswith('"remove snapshot"') and "cleanup" in marks and "remove snapshot" not in marks
            ):
                marks["remove snapshot"] = ln.t
        if ln.source == PODSHIM == shim:
            m = re.match(r'"?(->|<-) (\w+)', msg)
            if m:
                key = f"{m.group(1)} {m.group(2)}"
                marks.setdefault(key, ln.t)
    return marks


def split_phases(marks: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for label, a, b in PHASES:
        if a in marks and b in marks:
            out[label] = marks[b] - marks[a]
    if "/containers/create" in marks and "/containers/delete" in marks:
        out["total (ContainerCreate → ContainerDelete)"] = (
            marks["/containers/delete"] - marks["/containers/create"]
        )
    for rpc in SHIM_RPCS:
        if f"-> {rpc}" in marks and f"<- {rpc}" in marks:
            out[f"podshim: {rpc} RPC inside the shim"] = marks[f"<- {rpc}"] - marks[f"-> {rpc}"]
    if "-> Create" in marks and "up" in marks:
        out["podshim: server up → Create arrives"] = marks["-> Create"] - marks["up"]
    return out


def measure_split(env: Env, iterations: int) -> tuple[dict[str, dict[str, list[float]]], list[str]]:
    notes: list[str] = []
    phases: dict[str, dict[str, list[float]]] = {name: {} for name in ORDER}
    with env.log_level("debug") as in_force:
        if not in_force:
            notes.append("split skipped: containerd is not at log level debug and may not be restarted")
            return phases, notes
        env.warm_zygote()  # the restarted containerd's

        ids = itertools.count()

        def one(runtime: str, i: int) -> float | None:
            since = env.cd.log_size()
            elapsed = run_once(env, runtime, f"split-{runtime}-{next(ids)}")
            time.sleep(0.05)  # containerd writes the last lines of the run a moment later
            lines = parse_log(env.cd.log_tail(100000, since=since))
            if i >= 0:
                for label, value in split_phases(split_marks(lines, runtime)).items():
                    phases[runtime].setdefault(label, []).append(value)
                phases[runtime].setdefault("end to end (ctr, at debug level)", []).append(elapsed)
            return elapsed

        interleave(one, iterations=iterations, warmup=0 if env.smoke else 1)
    return phases, notes


# -- the scenario ----------------------------------------------------------------------------------


def run(env: Env, iterations: int = 20, warmup: int = 2) -> ScenarioResult:
    res = ScenarioResult(NAME, TITLE)
    ids = itertools.count()
    env.warm_zygote()
    times = interleave(
        lambda rt, i: run_once(env, rt, f"life-{rt}-{next(ids)}"),
        iterations=iterations,
        warmup=warmup,
        order=env.compared,
    )
    res.row("ctr run --rm (end to end)", "s", times, target=1.10)

    # The actions alone: both shims, and podshim's cold path (its Python entry point). The bench
    # itself is the "containerd" of these actions' zygote.
    variants = [
        Variant.of(RUNTIMES[RUNC]),
        Variant.of(RUNTIMES[PODSHIM]),
        Variant(PODSHIM_COLD, str(PYTHON_ENTRY)),
    ]
    warm_actions_zygote(env)
    keys = ("start", "start_addr", "start_reuse", "delete", "rss", "pss")
    acts: dict[str, dict[str, list[float]]] = {v.name: {k: [] for k in keys} for v in variants}
    ids = itertools.count()
    for i in range(-1, iterations):  # one warm-up round
        for v in variants:
            c = cycle(env, v, f"act-{next(ids)}")
            if i < 0:
                continue
            a = acts[v.name]
            a["start"].append(c.start.to_exit)
            a["start_addr"].append(c.start.to_address)
            a["start_reuse"].append(c.start_reuse.to_exit)
            a["delete"] += c.delete
            if c.baseline is not None:
                a["rss"].append(c.baseline.rss)
                a["pss"].append(c.baseline.pss)
    res.row("start action, new pod (exec → exit)", "s", {k: v["start"] for k, v in acts.items()}, target=1.5)
    res.row(
        "start action, pod's shim already up", "s", {k: v["start_reuse"] for k, v in acts.items()}, target=1.5
    )
    res.row("delete action (exec → exit)", "s", {k: v["delete"] for k, v in acts.items()}, target=1.5)
    res.details["actions"] = {n: {k: Summary.of(x).to_json() for k, x in a.items()} for n, a in acts.items()}
    header = ["variant", "start, new pod: → address", "→ exit", "start, shim up", "delete"]
    header += ["server RSS, no task", "PSS"]
    rows: list[list[str]] = []
    for name, a in acts.items():
        med = {k: Summary.of(x).median for k, x in a.items()}
        rows.append(
            [
                name,
                _ms(med["start_addr"]),
                _ms(med["start"]),
                _ms(med["start_reuse"]),
                _ms(med["delete"]),
                f"{med['rss'] / 1024:.1f} MiB",
                f"{med['pss'] / 1024:.1f} MiB",
            ]
        )
    res.tables["The shim's actions alone (medians; bench/actions.py)"] = (
        header,
        rows,
    )

    split, notes = measure_split(env, max(1, iterations // 2))
    res.notes += notes
    labels = list(dict.fromkeys(label for per in split.values() for label in per))
    if labels:
        res.details["split"] = {
            rt: {k: Summary.of(v).to_json() for k, v in per.items()} for rt, per in split.items()
        }
        rows = []  # the same list[list[str]] as above
        for label in labels:
            r = Summary.of(split[RUNC].get(label, []))
            p = Summary.of(split[PODSHIM].get(label, []))
            diff = p.median - r.median if r.n and p.n else float("nan")
            rows.append(
                [
                    label,
                    _ms(r.median) if r.n else "",
                    _ms(p.median) if p.n else "",
                    _ms(diff) if r.n and p.n else "",
                ]
            )
        res.tables["Where the time goes (log level debug, medians)"] = (
            ["phase", RUNC, PODSHIM, "podshim - runc-v2"],
            rows,
        )
    return res


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"
