"""Host-process pods over the Task API, driven by ctr with CRI's annotations: a sandbox with no
process, workloads that are plain host processes in cgroups of their own, and the seed's rules.

Only the admin's options make a pod host-process: the tests pass the options file `podshim
install` writes for its podshim-host handler, as CRI would for that handler
(`--runtime-config-path`); the annotation alone is refused."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from harness.ctr import Ctr
from harness.runtimes import PODSHIM

from podshim.cli.install import host_handler

IMAGE = "docker.io/library/busybox:latest"
CT = "io.kubernetes.cri.container-type"
SID = "io.kubernetes.cri.sandbox-id"
ROOTFS_LOCATION = "podshim.io/hostprocess-rootfs-location"


def annotations(**kv: str) -> list[str]:
    out: list[str] = []
    for k, v in kv.items():
        out += ["--annotation", f"{k}={v}"]
    return out


@pytest.fixture
def host_options(tmp_path: Path) -> Path:
    """The podshim-host handler's options file, with a directory for hostprocess-rootfs-location."""
    path = tmp_path / "podshim-host.toml"
    path.write_text(host_handler(rootfs_locations=(str(tmp_path / "hostprocess"),)).options)
    return path


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
