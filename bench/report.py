"""The results as JSON (every sample) and as Markdown (the table the README links to)."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench import REPO
from bench.env import PODSHIM, PODSHIM_COLD, RUNC, Env
from bench.stats import Row, ScenarioResult


def _cmd(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except OSError:
        return ""


def metadata(env: Env, *, smoke: bool, argv: list[str]) -> dict[str, Any]:
    rev = _cmd("git", "-C", str(REPO), "rev-parse", "--short", "HEAD")
    dirty = bool(_cmd("git", "-C", str(REPO), "status", "--porcelain", "--", "podshim"))
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": argv,
        "smoke": smoke,
        "git": rev + (" (podshim/ has uncommitted changes)" if dirty else ""),
        "host": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, {_mem_gib():.0f} GiB",
        "kernel": platform.release(),
        "containerd": _cmd("containerd", "--version"),
        "runc": _cmd("runc", "--version").splitlines()[0] if _cmd("runc", "--version") else "",
        "python": sys.version.split()[0],
        "pythondontwritebytecode": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
        "load_at_start": os.getloadavg()[0],
    }


def _mem_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 1024 / 1024


def to_json(meta: dict[str, Any], results: Sequence[ScenarioResult]) -> dict[str, Any]:
    return {
        "meta": meta,
        "scenarios": [
            {
                "name": r.name,
                "title": r.title,
                "seconds": r.seconds,
                "rows": [row.to_json() for row in r.rows],
                "tables": {k: {"header": h, "rows": rows} for k, (h, rows) in r.tables.items()},
                "details": r.details,
                "notes": r.notes,
            }
            for r in results
        ],
    }


def fmt(value: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "s":
        if value >= 1:
            return f"{value:.2f} s"
        if value >= 1e-3:
            return f"{value * 1e3:.1f} ms"
        return f"{value * 1e6:.0f} µs"
    if unit == "KiB":
        return f"{value / 1024:.1f} MiB"
    if unit == "req/s":
        return f"{value:,.0f}/s"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:g} {unit}"


def _status(row: Row) -> str:
    met = row.meets_target
    if met is None:
        return ""
    return "✅" if met else "❌"


def _target(row: Row) -> str:
    if row.target is None:
        return ""
    return f"{'≤' if row.better == 'lower' else '≥'} {row.target:.2f}"


def to_markdown(meta: dict[str, Any], results: Sequence[ScenarioResult], charts: Sequence[str] = ()) -> str:
    out: list[str] = ["# podshim vs runc-v2: benchmark results", ""]
    kind = (
        "smoke run (one iteration, smallest sizes: the numbers mean nothing)" if meta["smoke"] else "full run"
    )
    out.append(f"{kind}; {meta['date']}; podshim {meta['git']}; took {meta.get('seconds', 0):.0f} s.")
    out.append(
        f"Machine: {meta['host']}, kernel {meta['kernel']}; {meta['containerd']}; {meta['runc']}; "
        f"Python {meta['python']}; load average at start {meta['load_at_start']:.2f}."
    )
    if meta.get("pythondontwritebytecode"):
        out.append(
            "PYTHONDONTWRITEBYTECODE is set in this environment, so the editable install's podshim "
            "modules run without cached bytecode (see the `podshim+pyc` rows)."
        )
    out += [
        "",
        "Ratio = podshim / runc-v2 on the medians, both measured in this run, interleaved A B A B after a "
        "warm-up. For throughput, higher is better (a ratio below 1 is worse). podshim runs as installed: "
        "the C entry point and the warm zygote. podshim cold is its Python entry point alone (no zygote), "
        "in the same run (A B C A B C), where the scenario measures it.",
        "",
        "| scenario | measure | runc-v2 median (p90) | podshim median (p90) | ratio | target | "
        "| podshim cold median (p90) | cold ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for row in r.rows:
            runc = f"{fmt(row.runc.median, row.unit)} ({fmt(row.runc.p90, row.unit)})"
            pod = f"{fmt(row.podshim.median, row.unit)} ({fmt(row.podshim.p90, row.unit)})"
            cold = f"{fmt(row.cold.median, row.unit)} ({fmt(row.cold.p90, row.unit)})" if row.cold else ""
            cold_ratio = f"{row.ratio_cold:.2f}" if row.cold else ""
            out.append(
                f"| {r.name} | {row.metric.strip()} | {runc} | {pod} "
                f"| {row.ratio:.2f} | {_target(row)} | {_status(row)} | {cold} | {cold_ratio} |"
            )
    for chart in charts:
        out += ["", f"![{chart}]({chart})"]
    for r in results:
        out += ["", f"## {r.name}: {r.title}", "", f"Took {r.seconds:.1f} s."]
        for title, (header, rows) in r.tables.items():
            out += ["", f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        if r.notes:
            out += [""] + [f"* {n}" if not n.startswith("FAILED") else f"```\n{n}\n```" for n in r.notes]
    out.append("")
    return "\n".join(out)


def summary_text(results: Sequence[ScenarioResult]) -> str:
    lines = [f"{'measure':60} {RUNC:>12} {PODSHIM:>12} {'ratio':>7}   {PODSHIM_COLD:>12} {'ratio':>7}"]
    for r in results:
        for row in r.rows:
            cold = f"{fmt(row.cold.median, row.unit):>12} {row.ratio_cold:7.2f}" if row.cold else ""
            lines.append(
                f"{(r.name + ': ' + row.metric.strip())[:60]:60} {fmt(row.runc.median, row.unit):>12} "
                f"{fmt(row.podshim.median, row.unit):>12} {row.ratio:7.2f} {_status(row):1} {cold}"
            )
    return "\n".join(lines)
