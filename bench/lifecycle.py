"""Container lifecycle latency and shim memory, podshim beside containerd's runc shim.

    scripts/in-private-run.sh .venv/bin/python bench/lifecycle.py [--iterations 20]

One private containerd; `ctr run --rm busybox true` timed end to end, the two runtimes
interleaved A B A B after a warm-up; then the RSS and PSS of each runtime's shim serving one
running container. Every figure is also given as the ratio podshim / runc-v2 from this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from harness.containerd import PrivateContainerd  # noqa: E402
from harness.ctr import Ctr, cleanup_namespace  # noqa: E402
from harness.images import build_busybox_tarball, import_image  # noqa: E402

RUNTIMES = {"runc-v2": "io.containerd.runc.v2", "podshim": "io.containerd.podshim.v1"}
IMAGE = "docker.io/library/busybox:latest"


def run_once(ctr: Ctr, runtime: str, cid: str) -> float:
    t0 = time.perf_counter()
    ctr.check("run", "--rm", "--runtime", runtime, IMAGE, cid, "true")
    return time.perf_counter() - t0


def memory_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


def shim_memory(ctr: Ctr, runtime: str, cid: str) -> tuple[int, int]:
    ctr.check("run", "-d", "--runtime", runtime, IMAGE, cid, "sleep", "600")
    try:
        ctr.wait_task_status(cid, "RUNNING")
        line = next(row for row in ctr.check("task", "ls").splitlines()[1:] if row.split()[0] == cid)
        task_pid = int(line.split()[1])
        stat = Path(f"/proc/{task_pid}/stat").read_text()
        shim_pid = int(stat.rsplit(")", 1)[1].split()[1])
        time.sleep(0.5)  # let the shim settle after Start
        return memory_kib(shim_pid)
    finally:
        ctr.run("task", "kill", "-s", "KILL", cid)
        ctr.wait_task_status(cid, "STOPPED")
        ctr.check("task", "delete", cid)
        ctr.check("container", "rm", cid)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lifecycle.json"))
    args = ap.parse_args()
    with PrivateContainerd(Path(tempfile.mkdtemp(prefix="podshim-bench-")), log_level="info") as cd:
        ctr = Ctr(cd.address, "bench", timeout=60)
        import_image(ctr, build_busybox_tarball(cd.base / "busybox.tar"))
        times: dict[str, list[float]] = {name: [] for name in RUNTIMES}
        try:
            for i in range(2):  # warm-up: page cache, first-exec costs
                for name, rt in RUNTIMES.items():
                    run_once(ctr, rt, f"warm-{name}-{i}")
            for i in range(args.iterations):
                for name, rt in RUNTIMES.items():
                    times[name].append(run_once(ctr, rt, f"b-{name}-{i}"))
            memory = {name: shim_memory(ctr, rt, f"mem-{name}") for name, rt in RUNTIMES.items()}
        finally:
            cleanup_namespace(ctr)
    result = {
        name: {
            "median_s": statistics.median(ts),
            "p90_s": pct(ts, 0.9),
            "shim_rss_kib": memory[name][0],
            "shim_pss_kib": memory[name][1],
        }
        for name, ts in times.items()
    }
    ratio = {
        key: result["podshim"][key] / result["runc-v2"][key]
        for key in ("median_s", "p90_s", "shim_rss_kib", "shim_pss_kib")
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"iterations": args.iterations, "results": result, "ratio": ratio}, indent=2))
    print(f"ctr run --rm busybox true, {args.iterations} iterations each, interleaved")
    print(f"{'':10}{'median ms':>12}{'p90 ms':>10}{'shim RSS MiB':>14}{'shim PSS MiB':>14}")
    for name, r in result.items():
        print(f"{name:10}{r['median_s'] * 1e3:12.0f}{r['p90_s'] * 1e3:10.0f}"
              f"{r['shim_rss_kib'] / 1024:14.1f}{r['shim_pss_kib'] / 1024:14.1f}")  # fmt: skip
    print(f"{'ratio':10}{ratio['median_s']:12.2f}{ratio['p90_s']:10.2f}{ratio['shim_rss_kib']:14.2f}"
          f"{ratio['shim_pss_kib']:14.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
