"""Many create/start/exec/kill/delete cycles of workloads in one pod: the shim's fd count,
RSS and thread count stay flat (the first 100 cycles against the last 100).

The pod's sandbox is run by ctr with CRI's annotations; the workloads are created straight on
its shim's socket (as CRI would, minus containerd), on the sandbox's rootfs.  The full run
(1,000 cycles) is marked ``soak`` and deselected by default (README: ``scripts/test.sh -m soak``);
a short run of the same cycle keeps it working in the default suite.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness.containerd import PrivateContainerd
from harness.ctr import Ctr
from harness.runtimes import PODSHIM
from test_deadlines import RawClient, _any
from test_robustness import IMAGE, bundle, finish, shim_socket

from podshim.api import task_pb2

T = task_pb2
CT = "io.kubernetes.cri.container-type"
SID = "io.kubernetes.cri.sandbox-id"
POD = "soakpod"


@dataclass
class Sample:
    fds: int
    rss_kib: int
    threads: int


def sample(pid: int) -> Sample:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return Sample(
        fds=len(list(Path(f"/proc/{pid}/fd").iterdir())),
        rss_kib=int(status["VmRSS"].split()[0]),
        threads=int(status["Threads"]),
    )


def workload_bundle(base: dict[str, Any], rootfs: Path, where: Path, tid: str) -> Path:
    spec = copy.deepcopy(base)
    spec["root"] = {"path": str(rootfs), "readonly": True}
    spec["process"]["args"] = ["sleep", "600"]
    spec["process"]["terminal"] = False
    spec["annotations"] = {CT: "container", SID: POD}
    spec["linux"]["cgroupsPath"] = spec["linux"]["cgroupsPath"].rsplit("/", 1)[0] + "/" + tid
    where.mkdir()
    (where / "config.json").write_text(json.dumps(spec))
    return where


def cycles(containerd: PrivateContainerd, ctr: Ctr, tmp_path: Path, n: int) -> list[Sample]:
    ctr.check("run", "-d", "--runtime", PODSHIM, "--annotation", f"{CT}=sandbox", "--annotation",
              f"{SID}={POD}", IMAGE, POD, "sleep", "600")  # fmt: skip
    ctr.wait_task_status(POD, "RUNNING")
    sandbox = bundle(containerd, ctr, POD)
    base = json.loads((sandbox / "config.json").read_text())
    c = RawClient(shim_socket(containerd, ctr, POD))
    samples: list[Sample] = []
    try:
        shim_pid = T.ConnectResponse.FromString(c.ok("Connect", T.ConnectRequest(id=POD))).shim_pid
        exec_spec = _any({"args": ["sleep", "600"], "cwd": "/", "env": base["process"]["env"]})
        for i in range(n):
            tid = f"w{i}"
            b = workload_bundle(base, sandbox / "rootfs", tmp_path / tid, tid)
            # FIFOs as ctr and CRI give them, so that stdio's fds are part of every cycle.
            fifos = {name: b / name for name in ("out", "err", "eout", "eerr")}
            for f in fifos.values():
                os.mkfifo(f)
            c.ok("Create", T.CreateTaskRequest(id=tid, bundle=str(b), stdout=str(fifos["out"]),
                                               stderr=str(fifos["err"])))  # fmt: skip
            c.ok("Start", T.StartRequest(id=tid))
            c.ok("Exec", T.ExecProcessRequest(id=tid, exec_id="e", spec=exec_spec, stdout=str(fifos["eout"]),
                                              stderr=str(fifos["eerr"])))  # fmt: skip
            c.ok("Start", T.StartRequest(id=tid, exec_id="e"))
            c.ok("Kill", T.KillRequest(id=tid, exec_id="e", signal=9))
            waited = T.WaitResponse.FromString(c.ok("Wait", T.WaitRequest(id=tid, exec_id="e")))
            assert waited.exit_status == 137
            c.ok("Delete", T.DeleteRequest(id=tid, exec_id="e"))
            c.ok("Kill", T.KillRequest(id=tid, signal=9))
            assert T.WaitResponse.FromString(c.ok("Wait", T.WaitRequest(id=tid))).exit_status == 137
            c.ok("Delete", T.DeleteRequest(id=tid))
            shutil.rmtree(b)
            samples.append(sample(shim_pid))
    finally:
        c.close()
    finish(ctr, POD)
    return samples


EXECUTOR_WORKERS = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default


def assert_flat(samples: list[Sample], window: int) -> None:
    """The typical cycle of the last window ends where the typical one of the first did.  (One
    fd or thread comes and goes: the events connection, a child being spawned or reaped.)"""
    first, last = samples[:window], samples[-window:]
    a = [s.fds for s in first]
    b = [s.fds for s in last]
    assert statistics.median(b) <= statistics.median(a) and max(b) <= max(a) + 1, ("fds", a, b)
    # asyncio's default executor (off_loop) starts its workers lazily, up to its bound: reaching
    # a new high-water mark when two calls overlap under load is not a leak; passing the bound
    # is (a thread a cycle passes it within a few cycles).
    a = [s.threads for s in first]
    b = [s.threads for s in last]
    assert max(b) <= max(a) + EXECUTOR_WORKERS, ("threads", a, b)
    # RSS: Python's allocator keeps some slack; a leak of even 1 KiB a cycle shows over 900 cycles.
    rss_first = statistics.median(s.rss_kib for s in first)
    rss_last = statistics.median(s.rss_kib for s in last)
    assert rss_last <= rss_first * 1.05 + 1024, f"RSS grew from {rss_first} KiB to {rss_last} KiB"


def test_short_lifecycle_cycles_leak_no_fd(containerd: PrivateContainerd, ctr: Ctr, tmp_path: Path) -> None:
    samples = cycles(containerd, ctr, tmp_path, 30)
    assert_flat(samples[5:], 10)  # after a few warm-up cycles; one fd a cycle would be 15 more


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_1000_cycles_in_one_pod(containerd: PrivateContainerd, ctr: Ctr, tmp_path: Path) -> None:
    samples = cycles(containerd, ctr, tmp_path, 1000)
    assert_flat(samples, 100)
    first, last = samples[:100], samples[-100:]
    rss = [statistics.median(s.rss_kib for s in w) for w in (first, last)]
    print(
        f"soak: fds {max(s.fds for s in first)} -> {max(s.fds for s in last)}, "
        f"threads {max(s.threads for s in first)} -> {max(s.threads for s in last)}, "
        f"RSS {rss[0]} -> {rss[1]} KiB; RSS by cycle: "
        + ", ".join(f"{i}: {samples[i - 1].rss_kib}" for i in (100, 250, 500, 750, 1000))
    )
