"""Samples, summaries and the A B A B interleaving every scenario uses."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.env import ORDER, PODSHIM, PODSHIM_COLD, RUNC


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1): with few samples, a value that was really measured."""
    s = sorted(values)
    if not s:
        return math.nan
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


@dataclass(frozen=True)
class Summary:
    median: float
    p90: float
    n: int
    samples: tuple[float, ...] = ()

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary:
        v = tuple(values)
        if not v:
            return cls(math.nan, math.nan, 0)
        return cls(statistics.median(v), percentile(v, 0.9), len(v), v)

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "p90": self.p90, "n": self.n, "samples": list(self.samples)}


@dataclass
class Row:
    """One compared measure: both runtimes' summaries and podshim/runc-v2 on the medians.

    `better` says which direction is good ("lower" for times and memory, "higher" for throughput);
    `target` is the issue's bound on the ratio, if it sets one.
    """

    scenario: str
    metric: str
    unit: str
    runc: Summary
    podshim: Summary
    better: str = "lower"
    target: float | None = None
    note: str = ""
    cold: Summary | None = None  # podshim's cold path, where the scenario measures it

    @property
    def ratio_cold(self) -> float:
        if self.cold is None or not self.runc.median or math.isnan(self.runc.median):
            return math.nan
        return self.cold.median / self.runc.median

    @property
    def ratio(self) -> float:
        if not self.runc.median or math.isnan(self.runc.median):
            return math.nan
        return self.podshim.median / self.runc.median

    @property
    def ratio_p90(self) -> float:
        if not self.runc.p90 or math.isnan(self.runc.p90):
            return math.nan
        return self.podshim.p90 / self.runc.p90

    @property
    def meets_target(self) -> bool | None:
        if self.target is None or math.isnan(self.ratio):
            return None
        return self.ratio <= self.target if self.better == "lower" else self.ratio >= self.target

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "metric": self.metric,
            "unit": self.unit,
            RUNC: self.runc.to_json(),
            PODSHIM: self.podshim.to_json(),
            **({PODSHIM_COLD: self.cold.to_json(), "ratio_cold": self.ratio_cold} if self.cold else {}),
            "ratio": self.ratio,
            "ratio_p90": self.ratio_p90,
            "better": self.better,
            "target": self.target,
            "meets_target": self.meets_target,
            "note": self.note,
        }


@dataclass
class ScenarioResult:
    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    # Free-form tables for the report: {section title: (header, rows)}.
    tables: dict[str, tuple[list[str], list[list[str]]]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def row(self, metric: str, unit: str, values: Mapping[str, Iterable[float]], **kw: Any) -> Row:
        if PODSHIM_COLD in values:
            kw["cold"] = Summary.of(values[PODSHIM_COLD])
        r = Row(self.name, metric, unit, Summary.of(values[RUNC]), Summary.of(values[PODSHIM]), **kw)
        self.rows.append(r)
        return r


def interleave(
    run: Callable[[str, int], float | None],
    *,
    iterations: int,
    warmup: int,
    order: Sequence[str] = ORDER,
) -> dict[str, list[float]]:
    """Run `run(runtime, i)` for each runtime of `order`, A B A B, after `warmup` rounds whose
    results are dropped (first-exec costs, page cache, CRI's caches). Returns the samples per
    runtime; a run may return None to contribute no sample."""
    out: dict[str, list[float]] = {name: [] for name in order}
    for i in range(warmup):
        for name in order:
            run(name, -1 - i)
    for i in range(iterations):
        for name in order:
            value = run(name, i)
            if value is not None:
                out[name].append(value)
    return out
