"""Host-process pods over the Task API, driven by ctr with CRI's annotations: a sandbox with no
process, workloads that are plain host processes in cgroups of their own, and the seed's rules.

Only the admin's options make a pod host-process: the tests pass the options file `podshim
install` writes for its podshim-host handler, as CRI would for that handler
(`--runtime-config-path`); the annotation alone is refused."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest
from google.protobuf.empty_pb2 import Empty
from harness.containerd import PrivateContainerd
from harness.ctr import Ctr
from harness.poll import wait_until
from harness.runtimes import PODSHIM

from podshim.api import task_pb2
from podshim.ttrpc.client import Client

IMAGE = "docker.io/library/busybox:latest"
CT = "io.kubernetes.cri.container-type"
SID = "io.kubernetes.cri.sandbox-id"
ROOTFS_LOCATION = "podshim.io/hostprocess-rootfs-location"
TASK = "containerd.task.v2.Task"


def annotations(**kv: str) -> list[str]:
    out: list[str] = []
    for k, v in kv.items():
        out += ["--annotation", f"{k}={v}"]
    return out


def run_sandbox(
    ctr: Ctr, pod: str, options: Path | None, isolation: str = "host", **extra: str
) -> tuple[int, str, str]:
    ann = {CT: "sandbox", SID: pod, **extra}
    if isolation:
        ann["podshim.io/isolation"] = isolation
    opts = ["--runtime-config-path", str(options)] if options is not None else []
    res = ctr.run("run", "-d", "--runtime", PODSHIM, *opts, *annotations(**ann), IMAGE, pod, "sleep", "600")
    return res.rc, res.stdout, res.stderr


def run_workload(
    ctr: Ctr, pod: str, cid: str, *cmd: str, options: Path | None, **extra: str
) -> tuple[int, str, str]:
    ann = {CT: "container", SID: pod, **extra}
    opts = ["--runtime-config-path", str(options)] if options is not None else []
    res = ctr.run("run", "-d", "--runtime", PODSHIM, *opts, *annotations(**ann), IMAGE, cid, *cmd)
    return res.rc, res.stdout, res.stderr


def task_pid(ctr: Ctr, cid: str) -> int:
    for line in ctr.check("task", "ls").splitlines()[1:]:
        cols = line.split()
        if cols and cols[0] == cid:
            return int(cols[1])
    raise AssertionError(f"no task {cid}")


def ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def remove(ctr: Ctr, *cids: str) -> None:
    for cid in cids:
        ctr.run("task", "kill", "-s", "KILL", cid)
    for cid in cids:
        deadline = time.monotonic() + 15
        while ctr.task_status(cid) not in ("STOPPED", None) and time.monotonic() < deadline:
            time.sleep(0.05)
        ctr.run("task", "delete", cid)
        ctr.check("container", "rm", cid)


def test_host_process_pod(ctr: Ctr, tmp_path: Path, host_options: Path) -> None:
    pod = "hostpod"
    rc, _, err = run_sandbox(ctr, pod, host_options, isolation="")  # the handler's mode: no annotation
    assert rc == 0, err
    ctr.wait_task_status(pod, "RUNNING")
    shim = task_pid(ctr, pod)  # the sandbox has no process: its pid is the shim's own
    assert "containerd-shim-podshim-v1" in Path(f"/proc/{shim}/cmdline").read_text()

    res = ctr.run("task", "exec", "--exec-id", "no", pod, "true")
    assert res.rc != 0 and "not implemented" in res.stderr.lower(), res

    marker = tmp_path / "written-by-the-container"
    rc, _, err = run_workload(
        ctr, pod, "writer",
        "sh", "-c", f'echo "$CONTAINER_SANDBOX_MOUNT_POINT" > {marker}; exec sleep 600',
        options=host_options,
    )  # fmt: skip
    assert rc == 0, err
    rc, _, err = run_workload(ctr, pod, "viewer", "sleep", "600", options=host_options)
    assert rc == 0, err
    ctr.wait_task_status("writer", "RUNNING")
    ctr.wait_task_status("viewer", "RUNNING")

    # One shim for the pod: every workload is the shim's child.
    writer, viewer = task_pid(ctr, "writer"), task_pid(ctr, "viewer")
    for pid in (writer, viewer):
        assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == shim
    # A host process: the host's file system, network and pid namespaces.
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    mount_point = marker.read_text().strip()
    assert Path(mount_point, "bin", "busybox").exists(), "the image's rootfs is exposed to the process"
    for kind in ("net", "pid", "uts", "ipc"):
        assert ns(viewer, kind) == ns("self", kind), kind
    out = ctr.check(
        "task", "exec", "--exec-id", "look", "viewer", "sh", "-c", "cat /proc/1/comm; ls /sys/class/net"
    )
    assert set(os.listdir("/sys/class/net")) <= set(out.split()), out

    # Task API on a host-process task: exec, pids, stats.
    assert (
        ctr.check("task", "exec", "--exec-id", "e1", "writer", "echo", "exec works").strip() == "exec works"
    )
    assert str(writer) in ctr.check("task", "ps", "writer")
    assert (
        "memory.usage_in_bytes" in ctr.check("task", "metrics", "writer")
        or Path("/sys/fs/cgroup/cgroup.controllers").exists()
    )

    # A terminal: the process's controlling tty (ctr resizes it only after Start), its own session.
    res = ctr.run_tty("task", "exec", "-t", "--exec-id", "tty", "viewer", "sh", "-c",
                      "tty; [ $$ = $(cut -d' ' -f6 /proc/$$/stat) ] && echo leader; exit 4")  # fmt: skip
    assert res.rc == 4, res
    lines = res.stdout.replace("\r", "").split("\n")
    assert lines[0].startswith("/dev/pts/") and lines[1] == "leader", res.stdout

    # A mixed pod is refused: a container that opts out of being a host process.
    rc, _, err = run_workload(
        ctr, pod, "normal", "sleep", "600", options=host_options, **{"podshim.io/host-process": "false"}
    )
    assert rc != 0 and "normal container" in err, err
    ctr.run("container", "rm", "normal")

    remove(ctr, "writer", "viewer")
    remove(ctr, pod)


def test_kill_all_reaches_reparented_grandchildren(ctr: Ctr, host_options: Path) -> None:
    pod = "hostpod-kill"
    rc, _, err = run_sandbox(ctr, pod, host_options)
    assert rc == 0, err
    ctr.wait_task_status(pod, "RUNNING")
    # The grandchild double-forks away from its parent: only the cgroup still knows it.
    rc, _, err = run_workload(
        ctr, pod, "spawner", "sh", "-c", "(setsid sleep 600 &) ; exec sleep 600", options=host_options
    )
    assert rc == 0, err
    ctr.wait_task_status("spawner", "RUNNING")
    deadline = time.monotonic() + 10
    pids: list[str] = []
    while len(pids) < 2 and time.monotonic() < deadline:
        pids = [
            line.split()[0] for line in ctr.check("task", "ps", "spawner").splitlines()[1:] if line.strip()
        ]
        time.sleep(0.05)
    assert len(pids) >= 2, pids
    ctr.check("task", "kill", "--all", "-s", "KILL", pod)  # kill-all on the sandbox: the whole pod
    ctr.wait_task_status("spawner", "STOPPED")
    ctr.wait_task_status(pod, "STOPPED")
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
    remove(ctr, "spawner")
    remove(ctr, pod)


@pytest.mark.parametrize("ask", [{"podshim.io/host-process": "true"}, {"podshim.io/isolation": "host"}])
def test_normal_pod_refuses_a_host_process_container(ctr: Ctr, ask: dict[str, str]) -> None:
    pod = "normalpod"
    rc, _, err = run_sandbox(ctr, pod, None, isolation="process")
    assert rc == 0, err
    ctr.wait_task_status(pod, "RUNNING")
    rc, _, err = run_workload(ctr, pod, "sneaky", "sleep", "600", options=None, **ask)
    assert rc != 0 and "not host-process" in err, err
    ctr.run("container", "rm", "sneaky")
    remove(ctr, pod)


def test_the_annotation_alone_does_not_make_a_host_pod(ctr: Ctr) -> None:
    """Any pod author can write the annotation: without the admin's options it is refused, and
    nothing is left (the e2e guard checks processes, mounts, sockets, bundles, cgroups)."""
    rc, _, err = run_sandbox(ctr, "wannabe", None)
    assert rc != 0 and "'podshim.io/isolation: host' is not allowed" in err, err
    assert "invalid argument" in err.lower(), err
    ctr.run("container", "rm", "wannabe")


def test_rootfs_location_only_where_the_admin_allows(ctr: Ctr, tmp_path: Path, host_options: Path) -> None:
    location = tmp_path / "hostprocess"
    for bad in ("/etc", str(tmp_path / "elsewhere"), f"{location}/../elsewhere"):
        rc, _, err = run_sandbox(ctr, "hp-bad", host_options, **{ROOTFS_LOCATION: bad})
        assert rc != 0 and f"'{ROOTFS_LOCATION}: {bad}'" in err, err
        ctr.run("container", "rm", "hp-bad")
    assert not Path("/etc/hp-bad").exists()

    pod = "hp-located"
    rc, _, err = run_sandbox(ctr, pod, host_options, **{ROOTFS_LOCATION: str(location)})
    assert rc == 0, err
    ctr.wait_task_status(pod, "RUNNING")
    # A container's own annotation (container_annotations passes podshim.io/*) is checked too.
    rc, _, err = run_workload(
        ctr, pod, "own-dir", "sleep", "600", options=host_options, **{ROOTFS_LOCATION: "/etc"}
    )
    assert rc != 0 and f"'{ROOTFS_LOCATION}: /etc' is not under any of" in err, err
    ctr.run("container", "rm", "own-dir")
    assert not Path("/etc/own-dir").exists()
    rc, _, err = run_workload(ctr, pod, "placed", "sleep", "600", options=host_options)
    assert rc == 0, err
    ctr.wait_task_status("placed", "RUNNING")
    out = ctr.check(
        "task", "exec", "--exec-id", "where", "placed", "sh", "-c", "echo $CONTAINER_SANDBOX_MOUNT_POINT"
    )
    assert out.strip() == str(location / "placed")
    assert (location / "placed" / "bin" / "busybox").exists()
    remove(ctr, "placed")
    assert not (location / "placed").exists(), "the mount point the shim made is removed"
    remove(ctr, pod)


def _created_workload_bundle(base: Path, ctr: Ctr, pod: str, cid: str, args: list[str]) -> Path:
    """A bundle for a host-process workload that this test creates on the shim itself: ctr has
    no way to create a task without starting it."""
    bundle = base / cid
    (bundle / "rootfs").mkdir(parents=True)
    spec = {
        "ociVersion": "1.0.2",
        "process": {"args": args, "env": ["PATH=/usr/bin:/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "annotations": {CT: "container", SID: pod, "podshim.io/isolation": "host"},
        "linux": {"cgroupsPath": f"/{ctr.namespace}/{cid}"},
    }
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def _fds(pid: int) -> list[int]:
    return sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))


def _at_the_gate(pid: int) -> bool:
    """Blocked reading the gate (fd 4) before exec: `read` is syscall 0 on x86-64."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().startswith("0 0x4 ")
    except OSError:
        return False


async def _signal_a_created_init(sock: str, pod: str, cid: str, bundle: Path, sig: int) -> None:
    client = await Client.connect(sock)
    try:
        req = task_pb2.CreateTaskRequest(id=cid, bundle=str(bundle))
        created = await client.call(TASK, "Create", req, task_pb2.CreateTaskResponse)
        state = await client.call(TASK, "State", task_pb2.StateRequest(id=cid), task_pb2.StateResponse)
        assert (state.status, state.pid) == (1, created.pid)  # CREATED, with its real pid
        await asyncio.to_thread(wait_until, lambda: _at_the_gate(created.pid), 30, "the gate")
        # Nothing of the shim in it: default signal dispositions, an empty mask, its own session,
        # stdio and no other descriptor but the gate's own (3-5, closed by the exec).
        status = Path(f"/proc/{created.pid}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert int(fields["SigBlk"], 16) == 0 and int(fields["SigIgn"], 16) == 0, status
        assert os.getsid(created.pid) == created.pid
        assert _fds(created.pid) == [0, 1, 2, 4, 5]

        os.kill(created.pid, sig)
        waited = await asyncio.wait_for(
            client.call(TASK, "Wait", task_pb2.WaitRequest(id=cid), task_pb2.WaitResponse), 30
        )
        assert waited.exit_status == 128 + sig
        # The shim is alive and serves: its sandbox and the stopped task both answer.
        sandbox = await client.call(TASK, "State", task_pb2.StateRequest(id=pod), task_pb2.StateResponse)
        assert sandbox.status == 2  # RUNNING
        state = await client.call(TASK, "State", task_pb2.StateRequest(id=cid), task_pb2.StateResponse)
        assert (state.status, state.exit_status) == (3, 128 + sig)
        await client.call(TASK, "Delete", task_pb2.DeleteRequest(id=cid), task_pb2.DeleteResponse)

        # Started, the workload is what the gate exec'd: same pid, and still nothing of the shim.
        created = await client.call(TASK, "Create", req, task_pb2.CreateTaskResponse)
        started = await client.call(TASK, "Start", task_pb2.StartRequest(id=cid), task_pb2.StartResponse)
        assert started.pid == created.pid
        assert Path(f"/proc/{started.pid}/comm").read_text().strip() == "sleep"
        status = Path(f"/proc/{started.pid}/status").read_text()
        assert "SigBlk:\t0000000000000000" in status and "SigIgn:\t0000000000000000" in status, status
        # (The dynamic loader opens libraries for a moment after exec: wait for it to settle.)
        await asyncio.to_thread(wait_until, lambda: _fds(started.pid) == [0, 1, 2], 10, "stdio only")
        await client.call(TASK, "Kill", task_pb2.KillRequest(id=cid, signal=9), Empty)
        await client.call(TASK, "Wait", task_pb2.WaitRequest(id=cid), task_pb2.WaitResponse)
        await client.call(TASK, "Delete", task_pb2.DeleteRequest(id=cid), task_pb2.DeleteResponse)
    finally:
        await client.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_to_a_created_host_process_leaves_the_shim_serving(
    containerd: PrivateContainerd, ctr: Ctr, tmp_path: Path, host_options: Path, sig: signal.Signals
) -> None:
    """The shim itself stops on SIGTERM and SIGINT: the same signal sent to a created process
    ends that process alone."""
    pod = "hostpod-term"
    rc, _, err = run_sandbox(ctr, pod, host_options)
    assert rc == 0, err
    ctr.wait_task_status(pod, "RUNNING")
    shim = task_pid(ctr, pod)
    sock = (containerd.state / "io.containerd.runtime.v2.task" / ctr.namespace / pod / "address").read_text()
    bundle = _created_workload_bundle(tmp_path, ctr, pod, "held", ["sleep", "600"])
    asyncio.run(_signal_a_created_init(sock.removeprefix("unix://"), pod, "held", bundle, sig))
    assert Path(f"/proc/{shim}").exists(), "the shim died of a signal sent to its child"
    assert ctr.task_status(pod) == "RUNNING"
    assert ctr.check("task", "ls")  # containerd still reaches the shim
    remove(ctr, pod)
    wait_until(lambda: not Path(f"/proc/{shim}").exists(), 15, "the shim to exit")
