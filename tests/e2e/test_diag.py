"""Diag over real shims driven by ctr: the podshim CLI against a standalone task's shim, the log
FIFO's logfmt lines, SIGUSR1 stacks, and a shim that dies of an exception (panic.log)."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from harness.containerd import VENV_BIN, PrivateContainerd
from harness.ctr import Ctr
from harness.poll import wait_until
from harness.runtimes import PODSHIM

from podshim.api import diag_pb2 as D
from podshim.cli.diag import call
from podshim.cli.discovery import ShimProcess, find_shims
from podshim.shim import logfmt
from podshim.shim.daemon import FAULTS_ENV
from podshim.shim.main import VERSION

# Read by the shims this session's containerd starts: SIGUSR2 then makes a shim panic.
os.environ[FAULTS_ENV] = "1"

IMAGE = "docker.io/library/busybox:latest"
PODSHIM_CLI = str(VENV_BIN / "podshim")


def podshim(*args: str, timeout: float = 60.0, input: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PODSHIM_CLI, *args], capture_output=True, text=True, timeout=timeout, input=input, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


def shim_of(containerd: PrivateContainerd, task_id: str) -> ShimProcess:
    found: list[ShimProcess] = []

    def look() -> bool:
        found[:] = [
            s for s in find_shims() if s.id == task_id and str(containerd.address) in s.containerd_address
        ]
        return len(found) == 1

    wait_until(look, 10, f"the shim of {task_id}")
    return found[0]


def seconds(rfc3339: str) -> float:
    head, _, frac = rfc3339.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float(f"0.{frac or 0}")


def shim_lines(log: str, pid_marker: str = "") -> list[dict[str, str]]:
    """The shim's logfmt lines in containerd's log (containerd copies them verbatim)."""
    out = []
    for line in log.splitlines():
        if "runtime=io.containerd.podshim.v1" in line and line.startswith("time="):
            fields = logfmt.parse(line)
            if not pid_marker or fields.get("pod") == pid_marker:
                out.append(fields)
    return out


def run_standalone(ctr: Ctr, cid: str) -> None:
    """A detached `sleep` task on podshim; the ctr fixture force-removes it after the test."""
    ctr.check("run", "-d", "--runtime", PODSHIM, IMAGE, cid, "sleep", "600")


def test_cli_on_a_standalone_shim(ctr: Ctr, containerd: PrivateContainerd) -> None:
    since = containerd.log_size()
    cid = "diag-standalone"
    run_standalone(ctr, cid)
    shim = shim_of(containerd, cid)

    ctr.check("task", "exec", "-d", "--exec-id", "probe", cid, "sleep", "600")
    exec_pid = int(next(line.split()[0] for line in ctr.check("task", "ps", cid).splitlines()[1:]
                        if "probe" in line))  # fmt: skip

    # ps finds it with no flags, with what containerd reports.
    res = podshim("ps", "--json")
    assert res.returncode == 0, res.stderr
    mine = [e for e in json.loads(res.stdout) if e["pid"] == shim.pid]
    assert len(mine) == 1, res.stdout
    entry = mine[0]
    assert entry["namespace"] == ctr.namespace
    assert entry["pod"]["isolation"] == "process"
    (task,) = entry["tasks"]
    assert (task["id"], task["kind"], task["init"]["state"]) == (cid, "standalone", "running")
    (probe,) = task["execs"]
    assert (probe["id"], probe["state"], probe["pid"]) == ("probe", "running", exec_pid)
    init = task["init"]
    assert seconds(probe["started_at"]) >= seconds(init["started_at"]) >= seconds(init["created_at"]) > 0
    assert task["init"]["pid"] == int(ctr.check("task", "ls").split(cid)[1].split()[0])
    assert entry["shim"]["rss_bytes"] > 0 and entry["shim"]["pss_bytes"] > 0
    tree = podshim("ps")
    assert tree.returncode == 0 and cid in tree.stdout and f"shim {shim.pid}" in tree.stdout, tree.stdout
    assert f"exec probe · running · pid {exec_pid}" in tree.stdout, tree.stdout

    # Pid and Version, straight over the Diag service.
    assert asyncio.run(call(shim, "Pid", D.PidRequest(), D.PidResponse)).pid == shim.pid
    version = asyncio.run(call(shim, "Version", D.VersionRequest(), D.VersionResponse))
    assert (version.version, version.runtime) == (VERSION, PODSHIM)

    # tasks by container id; an unknown name says where it looked.
    res = podshim("tasks", cid)
    assert res.returncode == 0 and "running" in res.stdout, res.stdout + res.stderr
    res = podshim("tasks", "no-such-pod-anywhere")
    assert res.returncode != 0
    assert "no pod or container matches 'no-such-pod-anywhere'" in res.stderr
    assert f"{shim.pid}" in res.stderr and ctr.namespace in res.stderr, res.stderr

    # stacks: the server's asyncio tasks.
    res = podshim("stacks", cid)
    assert res.returncode == 0, res.stderr
    assert "asyncio task" in res.stdout and "Server.serve" in res.stdout, res.stdout

    # exec in the shim's namespaces: stdio streamed, exit code returned.
    res = podshim("exec", cid, "--", "sh", "-c", "read x; echo out:$x; echo err >&2; exit 3", input="hi\n")
    assert (res.returncode, res.stdout, res.stderr) == (3, "out:hi\n", "err\n")
    res = podshim("exec", "-t", cid, "--", "sh", "-c", "tty >/dev/null && echo is-a-tty; exit 5")
    assert res.returncode == 5 and "is-a-tty" in res.stdout, (res.stdout, res.stderr)
    res = podshim("exec", cid, "--", "/no/such/binary")
    assert res.returncode != 0 and "no such executable" in res.stderr, res.stderr

    # share needs a VM pod.
    res = podshim("share", cid, "/tmp", "/mnt/x")
    assert res.returncode != 0 and "needs a VM pod" in res.stderr, res.stderr

    # logs: the shim's own lines, as logfmt with the fields.
    res = podshim("logs", cid)
    assert res.returncode == 0, res.stderr
    lines = [logfmt.parse(line) for line in res.stdout.splitlines()]
    create = [f for f in lines if f.get("method") == "Create" and "duration" in f]
    assert create, res.stdout
    assert {"time", "level", "msg", "runtime", "pod", "id", "method", "duration"} <= create[0].keys()
    assert create[0]["id"] == cid and create[0]["pod"] == cid

    # The log FIFO carries the same lines into containerd's log.
    def logged(pred: Callable[[dict[str, str]], bool]) -> list[dict[str, str]]:
        return [f for f in shim_lines(containerd.log_tail(4000, since), cid) if pred(f)]

    def start_line(f: dict[str, str]) -> bool:
        return f.get("method") == "Start" and "duration" in f

    wait_until(lambda: logged(start_line), 10, "the shim's Start line in containerd's log")
    start = logged(start_line)[0]
    assert start["level"] in ("info", "debug") and start["id"] == cid and start["duration"].endswith("s")
    assert start["time"].endswith("Z") and "T" in start["time"]

    # logs -f follows: a new line (the SIGUSR1 dump below) shows up in a running `logs -f`.
    follow = subprocess.Popen([PODSHIM_CLI, "logs", "-f", cid], stdout=subprocess.PIPE)
    try:
        # SIGUSR1 writes the stacks into the log.
        os.kill(shim.pid, signal.SIGUSR1)

        def dumped(f: dict[str, str]) -> bool:
            return "stacks (SIGUSR1)" in f.get("msg", "")

        wait_until(lambda: logged(dumped), 10, "the SIGUSR1 stack dump in containerd's log")
        dump = logged(dumped)[0]["msg"]
        assert follow.stdout is not None
        seen = b""
        deadline = time.monotonic() + 20
        while b"stacks (SIGUSR1)" not in seen:
            left = deadline - time.monotonic()
            assert left > 0, "logs -f did not show the new line"
            if select.select([follow.stdout], [], [], left)[0]:
                chunk = os.read(follow.stdout.fileno(), 65536)
                assert chunk, "logs -f ended"
                seen += chunk
    finally:
        follow.kill()
        follow.wait()
    assert "asyncio task" in dump and "thread MainThread" in dump


def test_a_shim_panic_leaves_panic_log_in_containerds_log(ctr: Ctr, containerd: PrivateContainerd) -> None:
    since = containerd.log_size()
    cid = "diag-panic"
    run_standalone(ctr, cid)
    shim = shim_of(containerd, cid)
    os.kill(shim.pid, signal.SIGUSR2)
    wait_until(lambda: not Path(f"/proc/{shim.pid}").exists(), 10, "the shim to die")
    # containerd notices, runs the delete action, which copies panic.log into its log.
    wait_until(lambda: "found the shim's panic.log" in containerd.log_tail(4000, since), 20,
               "the delete action's copy of panic.log in containerd's log")  # fmt: skip
    log = containerd.log_tail(4000, since)
    assert "InjectedPanic: fault injection: SIGUSR2" in log
    fatal = [f for f in shim_lines(log) if f.get("level") == "fatal"]
    assert fatal and "Traceback" in fatal[0]["msg"], "the traceback also went to the log FIFO"
