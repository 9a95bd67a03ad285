"""PNG charts from latest.json: latency per measure for both runtimes, and cost per pod vs pod count."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt

from bench.env import ORDER, PODSHIM, RUNC

COLORS = {RUNC: "#4C72B0", PODSHIM: "#DD8452"}


def write_all(doc: dict[str, Any], out: Path) -> list[str]:
    written = []
    for name, fn in (
        ("latency.png", latency_chart),
        ("memory.png", memory_chart),
        ("scale.png", scale_chart),
    ):
        if fn(doc, out / name):
            written.append(name)
    return written


def _rows(doc: dict[str, Any], unit: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (s["name"], row)
        for s in doc["scenarios"]
        for row in s["rows"]
        if row["unit"] == unit and row[RUNC]["n"] and row[PODSHIM]["n"]
    ]


def _bars(doc: dict[str, Any], path: Path, unit: str, title: str, scale: float, ylabel: str) -> bool:
    """One small panel per measure: its own y scale, since the measures span µs to seconds."""
    rows = _rows(doc, unit)
    if not rows:
        return False
    cols = 4
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    for ax, (scenario, row) in zip(axes.flat, rows, strict=False):
        k, label_unit = scale, ylabel
        if unit == "s" and max(row[rt]["p90"] for rt in ORDER) < 2e-3:
            k, label_unit = 1e6, "µs"  # round trips: ms would read 0.0
        med = [row[rt]["median"] * k for rt in ORDER]
        p90 = [row[rt]["p90"] * k for rt in ORDER]
        ax.bar(ORDER, med, color=[COLORS[rt] for rt in ORDER], width=0.6)
        # The whisker runs from the median up to the p90.
        ax.errorbar(ORDER, med, yerr=[[0, 0], [max(0.0, p - m) for p, m in zip(p90, med, strict=True)]],
                    fmt="none", ecolor="black", capsize=4, linewidth=1)  # fmt: skip
        for x, m in enumerate(med):
            # Inside the bar, so the label never sits on the p90 whisker.
            ax.annotate(f"{m:.3g}", (x, m / 2), ha="center", va="center", fontsize=9, color="white",
                        fontweight="bold")  # fmt: skip
        ratio = row["ratio"]
        label = "\n".join(textwrap.wrap(f"{scenario}: {row['metric'].strip()}", 34))
        ax.set_title(f"{label}\npodshim/runc-v2 = {ratio:.2f}", fontsize=9)
        ax.set_ylabel(label_unit, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.set_ylim(0, max(max(p90), max(med)) * 1.25 or 1)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def latency_chart(doc: dict[str, Any], path: Path) -> bool:
    return _bars(doc, path, "s", "Latency per measure: median, whisker to p90", 1e3, "ms")


def memory_chart(doc: dict[str, Any], path: Path) -> bool:
    return _bars(doc, path, "KiB", "Shim memory: median, whisker to p90", 1 / 1024, "MiB")


def scale_chart(doc: dict[str, Any], path: Path) -> bool:
    scale = next((s for s in doc["scenarios"] if s["name"] == "scale" and "series" in s["details"]), None)
    if scale is None:
        return False
    series = scale["details"]["series"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for rt in ORDER:
        counts = sorted(int(n) for n in series[rt])
        pts = [series[rt][str(n)] for n in counts]
        ax1.plot(counts, [p["per_pod_s"] * 1e3 for p in pts], "o-", color=COLORS[rt], label=rt)
        ax2.plot(counts, [p["pss_per_pod_kib"] / 1024 for p in pts], "o-", color=COLORS[rt], label=rt)
        ax3.plot(counts, [p["pss_total_kib"] / 1024 for p in pts], "o-", color=COLORS[rt], label=rt)
    for ax, title, ylabel in (
        (ax1, "Start time per pod (wall / N, concurrency 4)", "ms per pod"),
        (ax2, "Shim PSS per pod", "MiB per pod"),
        (ax3, "Total shim PSS", "MiB"),
    ):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("pods")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log")
        counts = sorted(int(n) for n in series[RUNC])
        ax.set_xticks(counts)
        ax.set_xticklabels([str(c) for c in counts])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Cost per pod against pod count", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
