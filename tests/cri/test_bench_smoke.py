"""The benchmark suite's smoke run: every scenario once, at its smallest size, so that it cannot rot.

Not a benchmark (CI runs no full bench; see bench/README.md): the numbers are not checked, only
that each scenario runs against both runtimes, yields a sample for each of its measures, and that
the report and the charts can be written. It runs on the CRI package's containerd with this test's
CriClient, so the `cri` fixture's guard fails the test if the bench leaves anything behind.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path

import pytest
from harness.ctr import Ctr, cleanup_namespace
from harness.images import build_busybox_tarball, import_image

from bench import report
from bench.__main__ import SCENARIOS, run_scenarios
from bench.env import Env

from .client import CriClient
from .harness import CriContainerd


def test_bench_smoke(cri: CriClient, cri_containerd: CriContainerd, busybox: str, tmp_path: Path) -> None:
    # ctr's containers go under the same cgroup parent as this test's pods: the guard sees both.
    namespace = cri.cgroup_parent.lstrip("/")
    ctr = Ctr(cri_containerd.address, namespace, timeout=60.0)
    import_image(ctr, build_busybox_tarball(tmp_path / "busybox.tar"))
    env = Env(cd=cri_containerd, ctr=ctr, cri=cri, image=busybox, smoke=True)
    try:
        results = run_scenarios(env, list(SCENARIOS))
    finally:
        problems = cleanup_namespace(ctr)
        ctr.run("images", "rm", busybox)
        ctr.run("namespaces", "rm", namespace)
        shutil.rmtree(env.scratch, ignore_errors=True)
    assert not problems, problems

    assert [r.name for r in results] == list(SCENARIOS)
    for r in results:
        if r.name == "profile":  # podshim only, and only where py-spy is installed
            assert r.tables or any("py-spy" in n for n in r.notes), r.notes
            continue
        assert r.rows, f"{r.name} measured nothing"
        for row in r.rows:
            for side in (row.runc, row.podshim):
                assert side.n >= 1 and not math.isnan(side.median), f"{r.name}: {row.metric}: no sample"
    lifecycle = next(r for r in results if r.name == "lifecycle")
    # The fixture's containerd logs at debug, so the split from its log must be there.
    assert "Where the time goes (log level debug, medians)" in lifecycle.tables, lifecycle.notes

    meta = {"date": "smoke", "git": "", "host": "", "kernel": "", "containerd": "", "runc": "", "python": "",
            "smoke": True, "load_at_start": 0.0}  # fmt: skip
    doc = report.to_json(meta, results)
    charts: list[str] = []
    if importlib.util.find_spec("matplotlib") is not None:
        from bench import charts as chart_mod

        charts = chart_mod.write_all(doc, tmp_path)
        assert {"latency.png", "scale.png"} <= set(charts)
    text = report.to_markdown(meta, results, charts)
    assert "| lifecycle |" in text


pytestmark = pytest.mark.timeout(120)
