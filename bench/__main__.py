"""`python -m bench [--smoke] [--only SCENARIO ...]`: the suite's entry point (scripts/bench.sh runs
it inside a private mount namespace). Writes bench/results/latest.{md,json} and the PNG charts."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import REPO
from bench.env import BenchEnv, Env
from bench.scenarios import execstorm, lifecycle, memory, podstart, profile, rpc, scale, vmpod
from bench.stats import ScenarioResult

RESULTS = REPO / "bench" / "results"

# name -> (run, full-size arguments, smoke arguments)
Scenario = tuple[Callable[..., ScenarioResult], dict[str, Any], dict[str, Any]]
SCENARIOS: dict[str, Scenario] = {
    lifecycle.NAME: (lifecycle.run, {"iterations": 20, "warmup": 2}, {"iterations": 1, "warmup": 0}),
    podstart.NAME: (podstart.run, {"iterations": 10, "warmup": 1}, {"iterations": 1, "warmup": 0}),
    rpc.NAME: (rpc.run, {"calls": 2000, "rounds": 5, "total": 4000}, {"calls": 20, "rounds": 1, "total": 40}),
    memory.NAME: (memory.run, {"pods": 3, "reps": 5}, {"pods": 1, "reps": 1}),
    profile.NAME: (profile.run, {"actions": 10, "churn": 10}, {"actions": 1, "churn": 1}),
    scale.NAME: (scale.run, {"counts": (1, 10, 50, 100)}, {"counts": (1,)}),
    execstorm.NAME: (execstorm.run, {"calls": 200}, {"calls": 2}),
    vmpod.NAME: (
        vmpod.run,
        {"iterations": 3, "warmup": 0, "side_by_side": (1, 3, 10)},
        {"iterations": 1, "warmup": 0, "side_by_side": (1,)},
    ),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/bench.sh", description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="one iteration of each scenario, smallest sizes")
    ap.add_argument("--only", nargs="+", choices=list(SCENARIOS), metavar="SCENARIO",
                    help=f"run only these ({', '.join(SCENARIOS)})")  # fmt: skip
    ap.add_argument("--iterations", type=int, help="iterations for lifecycle and podstart (default 20 / 10)")
    ap.add_argument(
        "--scale", type=int, nargs="+", help="pod counts for the scale scenario (default 1 10 50 100)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="where latest.md, latest.json and the PNGs go")
    ap.add_argument("--no-charts", action="store_true")
    ap.add_argument("--keep-log", action="store_true", help="copy containerd's log to --out")
    return ap.parse_args(argv)


def run_scenarios(
    env: Env, names: Sequence[str], args: argparse.Namespace | None = None
) -> list[ScenarioResult]:
    """Run the named scenarios on `env` in order; a failing scenario is reported, not fatal."""
    results: list[ScenarioResult] = []
    for name in names:
        fn, full, small = SCENARIOS[name]
        kwargs = dict(small if env.smoke else full)
        if args is not None and args.iterations and "iterations" in kwargs:
            kwargs["iterations"] = args.iterations
        if args is not None and args.scale and name == scale.NAME:
            kwargs["counts"] = tuple(args.scale)
        print(f"[bench] {name} {kwargs}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            res = fn(env, **kwargs)
        except Exception:
            if env.smoke:
                raise  # the smoke test must fail loudly
            res = ScenarioResult(name, name, notes=[f"FAILED:\n{traceback.format_exc()}"])
            print(res.notes[0], file=sys.stderr)
        res.seconds = time.perf_counter() - t0
        print(f"[bench] {name} done in {res.seconds:.1f} s", file=sys.stderr, flush=True)
        results.append(res)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from bench import report

    names = args.only or list(SCENARIOS)
    started = time.time()
    bench_env = BenchEnv(smoke=args.smoke)
    if args.keep_log:
        bench_env.keep_log = args.out / "containerd.log"
    with bench_env as env:
        meta = report.metadata(env, smoke=args.smoke, argv=list(argv if argv is not None else sys.argv[1:]))
        results = run_scenarios(env, names, args)
        if any(n.startswith("FAILED") for r in results for n in r.notes):
            # Keep containerd's log (the shims write into it) for the post-mortem.
            bench_env.keep_log = args.out / "containerd-failed-run.log"
    meta["seconds"] = time.time() - started
    args.out.mkdir(parents=True, exist_ok=True)
    doc = report.to_json(meta, results)
    (args.out / "latest.json").write_text(json.dumps(doc, indent=2))
    charts: list[str] = []
    if not args.no_charts:
        from bench import charts as chart_mod

        with contextlib.suppress(ImportError):
            charts = chart_mod.write_all(doc, args.out)
    (args.out / "latest.md").write_text(report.to_markdown(meta, results, charts))
    print(report.summary_text(results))
    print(f"[bench] wrote {args.out / 'latest.md'}, latest.json and {len(charts)} chart(s)", file=sys.stderr)
    return 1 if any(n.startswith("FAILED") for r in results for n in r.notes) else 0


if __name__ == "__main__":
    sys.exit(main())
