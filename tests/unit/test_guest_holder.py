"""The VM pod's sandbox holder (:mod:`podshim.guest.holder`), run for real on the host: a small
driver stands in for the agent (a child subreaper with the agent's reaper, so the holder is its
orphan as it is the agent's), forks a spare holder, gives it its orders and reports what the
holder became."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from podshim.guest import holder
from podshim.guest.errors import InvalidArgument

DRIVER = r"""
import ctypes, json, os, subprocess, sys, threading
from podshim.guest import holder
from podshim.guest.errors import AgentError
from podshim.guest.reaper import REAPER
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
REAPER.start()
holder.EMPTY_ROOT = sys.argv[1]
holder.prepare()
spare = holder.Spare.start()
out = {"pid": spare.pid, "error": ""}
exits = []
gone = threading.Event()
def exited(ex):
    exits.append(ex.status)
    gone.set()
if len(sys.argv) > 4:  # the spare dies before its pod comes
    os.kill(spare.pid, 9)
    while spare.alive:
        threading.Event().wait(0.01)
try:
    spare.hold(holder.parse(json.loads(sys.argv[2])), exited)
except AgentError as e:
    out["error"] = str(e)
if not out["error"]:
    pid = spare.pid
    out["status"] = open(f"/proc/{pid}/status").read()
    out["root"] = os.listdir(f"/proc/{pid}/root")
    out["fds"] = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    out["own_ns"] = {ns: os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
                     for ns in ("ipc", "uts", "pid", "mnt", "net")}
    out["oom_score_adj"] = open(f"/proc/{pid}/oom_score_adj").read().strip()
    run = lambda ns, *argv: subprocess.run(["nsenter", f"--{ns}=/proc/{pid}/ns/{ns}", *argv],
                                          capture_output=True, text=True).stdout.strip()
    out["hostname"] = run("uts", "hostname")
    out["msgmax"] = run("ipc", "cat", "/proc/sys/kernel/msgmax")
    os.kill(pid, int(sys.argv[3]))
gone.wait(10)
out["exits"] = exits
print(json.dumps(out))
"""


def _drive(tmp_path: Path, req: dict[str, Any], signal: int = 15, spare_dies: bool = False) -> dict[str, Any]:
    argv = [sys.executable, "-c", DRIVER, str(tmp_path / "empty"), json.dumps(req), str(signal)]
    res = subprocess.run(
        argv + (["dies"] if spare_dies else []),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def _status(out: dict[str, Any]) -> dict[str, list[str]]:
    lines = str(out["status"]).splitlines()
    return {k: v.split() for k, _, v in (line.partition(":") for line in lines)}


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare and setuid need root")
def test_the_holder_holds_the_namespaces_and_gives_up_everything(tmp_path: Path) -> None:
    req = {
        "namespaces": ["ipc", "uts", "pid"],
        "hostname": "web-0",
        "sysctl": {"kernel.msgmax": "4242"},
        "uid": 0,  # a root sandbox spec: the holder still never runs as root
        "gid": 0,
        "oom_score_adj": 500,
    }
    out = _drive(tmp_path, req)
    assert out["error"] == ""
    st = _status(out)
    assert st["Name"] == ["pod-sandbox"]
    assert st["Uid"] == [str(holder.NOBODY)] * 4 and st["Gid"] == [str(holder.NOBODY)] * 4
    assert st["CapEff"] == ["0000000000000000"] and st["CapPrm"] == ["0000000000000000"]
    assert st["NoNewPrivs"] == ["1"]
    assert st["NSpid"][-1] == "1"  # the first process of the pod's PID namespace
    assert out["own_ns"] == {"ipc": True, "uts": True, "pid": True, "mnt": False, "net": False}
    assert out["root"] == []  # chrooted into an empty directory
    assert set(out["fds"]) == {"0", "1", "2"} and set(out["fds"].values()) == {"/dev/null"}
    assert out["oom_score_adj"] == "500"
    assert out["hostname"] == "web-0"
    assert out["msgmax"] == "4242"  # set in the pod's IPC namespace only
    assert out["exits"] == [0]  # SIGTERM ends it as it ends pause
    assert Path("/proc/sys/kernel/msgmax").read_text().strip() != "4242"
    assert (tmp_path / "empty").stat().st_mode & 0o777 == 0o555


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare and setuid need root")
def test_sigkill_ends_the_holder(tmp_path: Path) -> None:
    out = _drive(tmp_path, {"namespaces": ["pid"]}, signal=9)
    assert out["error"] == "" and out["exits"] == [128 + 9]


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare and setuid need root")
def test_a_holder_that_cannot_set_up_reports_why_and_is_gone(tmp_path: Path) -> None:
    out = _drive(tmp_path, {"namespaces": ["ipc"], "sysctl": {"kernel.no_such_sysctl": "1"}})
    assert "no_such_sysctl" in out["error"] and out["exits"] == [1]  # gone, its exit delivered


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare and setuid need root")
def test_a_spare_that_died_before_its_pod_is_reported_not_waited_for(tmp_path: Path) -> None:
    out = _drive(tmp_path, {"namespaces": ["pid"]}, spare_dies=True)
    assert "died before it was set up" in out["error"] and out["exits"] == [128 + 9]


@pytest.mark.parametrize(
    "req",
    [
        {"namespaces": ["user"]},
        {"namespaces": "pid"},
        {"sysctl": {"../../etc/passwd": "x"}},
        {"sysctl": {"kernel..x": "1"}},
        {"sysctl": {"kernel.x": 1}},
        {"uid": -1},
        {"uid": True},
        {"oom_score_adj": 5000},
        {"hostname": "h" * 65},
    ],
)
def test_bad_hold_requests_are_invalid_argument(req: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        holder.parse(req)


@pytest.mark.parametrize("path", ["/../../sys/fs/cgroup", "pods/../../escape", "/", ""])
def test_a_sandbox_cgroup_path_that_leaves_the_guests_tree_is_refused(path: str) -> None:
    from podshim.guest.containers import Container, Proc

    c = Container(None, "sb", "", held=True)  # type: ignore[arg-type]  # no agent is reached
    c.init = Proc(c, "", None)  # type: ignore[arg-type]
    c.init.pid = 1
    with pytest.raises(InvalidArgument, match="bad cgroups path"):
        c.place_in_cgroup(path)
    assert c.cgroup is None
