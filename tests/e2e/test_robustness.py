"""podshim under stress that ctr alone cannot script: containerd restarts, a killed shim, and bad
input sent straight to the shim's socket with our own ttrpc client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
from google.protobuf.empty_pb2 import Empty as _Empty
from harness import leaks
from harness.containerd import PrivateContainerd
from harness.ctr import Ctr
from harness.poll import wait_until
from harness.runtimes import PODSHIM, RUNC_V2

from podshim import errdefs
from podshim.api import task_pb2
from podshim.ttrpc.client import Client
from podshim.ttrpc.codec import MAX_MESSAGE
from podshim.vm import qemu

IMAGE = "docker.io/library/busybox:latest"
TASK = "containerd.task.v2.Task"
PROCESS_SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
CT = "io.kubernetes.cri.container-type"
SID = "io.kubernetes.cri.sandbox-id"


def bundle(cd: PrivateContainerd, ctr: Ctr, cid: str) -> Path:
    return cd.state / "io.containerd.runtime.v2.task" / ctr.namespace / cid


def shim_socket(cd: PrivateContainerd, ctr: Ctr, cid: str) -> str:
    address = (bundle(cd, ctr, cid) / "address").read_text()
    assert address.startswith("unix://") and not address.endswith("\n")
    return address.removeprefix("unix://")


def task_pid(ctr: Ctr, cid: str) -> int:
    for line in ctr.check("task", "ls").splitlines()[1:]:
        cols = line.split()
        if cols and cols[0] == cid:
            return int(cols[1])
    raise AssertionError(f"no task {cid}")


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def run_detached(ctr: Ctr, runtime: str, cid: str, *args: str) -> None:
    ctr.check("run", "-d", "--runtime", runtime, IMAGE, cid, *args)
    ctr.wait_task_status(cid, "RUNNING")


def finish(ctr: Ctr, cid: str) -> None:
    ctr.run("task", "kill", "-s", "KILL", cid)
    deadline = time.monotonic() + 15
    while ctr.task_status(cid) not in ("STOPPED", None) and time.monotonic() < deadline:
        time.sleep(0.05)
    ctr.run("task", "delete", cid)
    ctr.check("container", "rm", cid)


def test_task_survives_containerd_restart(containerd: PrivateContainerd, ctr: Ctr) -> None:
    run_detached(ctr, PODSHIM, "survivor", "sleep", "600")
    pid = task_pid(ctr, "survivor")
    containerd.restart()
    assert ctr.task_status("survivor") == "RUNNING"
    assert task_pid(ctr, "survivor") == pid
    out = ctr.check("task", "exec", "--exec-id", "after-restart", "survivor", "echo", "still here")
    assert out.strip() == "still here"
    ctr.check("task", "pause", "survivor")
    assert ctr.task_status("survivor") == "PAUSED"
    ctr.check("task", "resume", "survivor")
    finish(ctr, "survivor")


def _kill_shim(containerd: PrivateContainerd, ctr: Ctr, runtime: str, cid: str) -> int:
    """SIGKILL the shim of a running task; return the exit status containerd then reports."""
    run_detached(ctr, runtime, cid, "sleep", "600")
    container_pid = task_pid(ctr, cid)
    shim = parent_pid(container_pid)
    assert "containerd-shim" in Path(f"/proc/{shim}/cmdline").read_text()
    sock = shim_socket(containerd, ctr, cid)
    with ctr.events().start() as events:
        os.kill(shim, signal.SIGKILL)
        exit_event = events.wait_for(lambda e: e.topic == "/tasks/exit" and e.container_id == cid, timeout=15)
    deadline = time.monotonic() + 15
    while os.path.exists(f"/proc/{container_pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{container_pid}"), "the container outlived its shim's cleanup"
    if runtime == PODSHIM:
        assert not os.path.exists(sock), "the dead shim's socket was left behind"
    else:
        os.unlink(sock)  # runc-v2 leaves its dead shim's socket behind; podshim's `delete` does not
    assert ctr.task_status(cid) is None
    ctr.check("container", "rm", cid)
    status = exit_event.payload.get("exit_status", 0)
    assert isinstance(status, int)
    return status


def test_killed_shim_is_cleaned_up_like_runc_v2(containerd: PrivateContainerd, ctr: Ctr) -> None:
    reference = _kill_shim(containerd, ctr, RUNC_V2, "victim-runc")
    ours = _kill_shim(containerd, ctr, PODSHIM, "victim-podshim")
    # containerd publishes the exit itself, with what our `delete` action reported.
    assert reference == 137
    assert ours == reference


async def _bad_input(sock_path: str, cid: str) -> None:
    client = await Client.connect(sock_path)
    try:
        with pytest.raises(errdefs.NotFound):
            await client.call(TASK, "State", task_pb2.StateRequest(id="no-such-task"), task_pb2.StateResponse)
        with pytest.raises(errdefs.NotFound):
            await client.call(
                TASK, "State", task_pb2.StateRequest(id=cid, exec_id="nope"), task_pb2.StateResponse
            )
        with pytest.raises(errdefs.InvalidArgument):
            await client.call(TASK, "Exec", task_pb2.ExecProcessRequest(id=cid, exec_id="nospec"), _Empty)
        spec = json.dumps({"args": ["true"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}})
        req = task_pb2.ExecProcessRequest(id=cid, exec_id="dup")
        req.spec.type_url = PROCESS_SPEC_URL
        req.spec.value = spec.encode()
        await client.call(TASK, "Exec", req, _Empty)
        with pytest.raises(errdefs.AlreadyExists):
            await client.call(TASK, "Exec", req, _Empty)
        await client.call(
            TASK, "Delete", task_pb2.DeleteRequest(id=cid, exec_id="dup"), task_pb2.DeleteResponse
        )
        await client.call(TASK, "Exec", req, _Empty)  # the id is free again after Delete
        await client.call(
            TASK, "Delete", task_pb2.DeleteRequest(id=cid, exec_id="dup"), task_pb2.DeleteResponse
        )
        created = task_pb2.ExecProcessRequest(id=cid, exec_id="never-started", spec=req.spec)
        await client.call(TASK, "Exec", created, _Empty)
        with pytest.raises(errdefs.FailedPrecondition):  # an exec that was never started has no pid
            await client.call(
                TASK, "Kill", task_pb2.KillRequest(id=cid, exec_id="never-started", signal=9), _Empty
            )
        await client.call(
            TASK, "Delete", task_pb2.DeleteRequest(id=cid, exec_id="never-started"), task_pb2.DeleteResponse
        )
        with pytest.raises(errdefs.NotFound):
            await client.call(
                TASK, "Kill", task_pb2.KillRequest(id=cid, exec_id="never-started", signal=9), _Empty
            )
    finally:
        await client.close()


def _raw_frame(stream: int, payload: bytes, msg_type: int = 1, length: int | None = None) -> bytes:
    return struct.pack(">IIBB", len(payload) if length is None else length, stream, msg_type, 0) + payload


def _read_frame(s: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 10:
        chunk = s.recv(10 - len(header))
        assert chunk, "the shim closed the connection"
        header += chunk
    length, stream, _, _ = struct.unpack(">IIBB", header)
    body = b""
    while len(body) < length:
        chunk = s.recv(length - len(body))
        assert chunk
        body += chunk
    return stream, body


def test_bad_input_gets_clear_errors_and_shim_keeps_serving(containerd: PrivateContainerd, ctr: Ctr) -> None:
    run_detached(ctr, PODSHIM, "target", "sleep", "600")
    sock_path = shim_socket(containerd, ctr, "target")
    asyncio.run(_bad_input(sock_path, "target"))

    from podshim.api import ttrpc_pb2

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock_path)
        # Garbage that is not a ttrpc Request: an error reply on the same stream, connection kept.
        s.sendall(_raw_frame(1, b"\xff\xff\xff\xff garbage"))
        stream, body = _read_frame(s)
        resp = ttrpc_pb2.Response.FromString(body)
        assert stream == 1 and resp.status.code != 0
        # An oversized frame: ResourceExhausted on its stream, its payload discarded.
        big = MAX_MESSAGE + 1
        s.sendall(_raw_frame(3, b"\0" * big))
        stream, body = _read_frame(s)
        resp = ttrpc_pb2.Response.FromString(body)
        assert stream == 3 and resp.status.code == errdefs.Code.RESOURCE_EXHAUSTED
        assert str(big) in resp.status.message
        # And a well-formed request still works on the same connection.
        req = ttrpc_pb2.Request(
            service=TASK, method="State", payload=task_pb2.StateRequest(id="target").SerializeToString()
        )
        s.sendall(_raw_frame(5, req.SerializeToString()))
        stream, body = _read_frame(s)
        resp = ttrpc_pb2.Response.FromString(body)
        assert stream == 5 and resp.status.code == 0
        assert task_pb2.StateResponse.FromString(resp.payload).status == 2  # RUNNING

    # containerd still drives the task normally through the same shim.
    assert ctr.check("task", "exec", "--exec-id", "ok", "target", "echo", "fine").strip() == "fine"
    finish(ctr, "target")


def _pod_args(pod: str, kind: str, isolation: str, host_options: Path) -> list[str]:
    """ctr run's runtime flags for a pod's sandbox or container: CRI's annotations, and for a
    host-process pod the admin's host handler options (the annotation alone is refused)."""
    ann = {CT: kind, SID: pod}
    if isolation != "host":
        ann["podshim.io/isolation"] = isolation
    opts = ["--runtime-config-path", str(host_options)] if isolation == "host" else []
    return ["--runtime", PODSHIM, *opts, *(a for k, v in ann.items() for a in ("--annotation", f"{k}={v}"))]


def _pod_processes(pod_tasks: list[int]) -> set[int]:
    """The tasks' pids and every descendant that is still theirs (a daemonised one included,
    through /proc/<pid>/task/*/children at the time of the call)."""
    found: set[int] = set()
    todo = list(pod_tasks)
    while todo:
        pid = todo.pop()
        if pid in found or not os.path.exists(f"/proc/{pid}"):
            continue
        found.add(pid)
        for tid in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
            with contextlib.suppress(OSError):
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for whichever ancestor reaps orphans."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("isolation", ["process", "host", "vm"])
def test_killed_pod_shim_leaves_nothing(
    containerd: PrivateContainerd, ctr: Ctr, isolation: str, host_options: Path
) -> None:
    """SIGKILL a pod's shim in each isolation mode: containerd's `delete` action (once per task)
    leaves no process (a daemonised one included), cgroup, mount, socket, VM run dir or qemu.
    The e2e guard checks processes, mounts, sockets, bundles and cgroups; this test checks the
    pod's own processes, qemu and the VM run dir as well."""
    pod, app = f"killed-{isolation}", f"killed-{isolation}-app"
    timeout = 240 if isolation == "vm" else 30
    ctr.check("run", "-d", *_pod_args(pod, "sandbox", isolation, host_options), IMAGE, pod,
              "sleep", "600", timeout=timeout)  # fmt: skip
    ctr.wait_task_status(pod, "RUNNING", timeout=timeout)
    # A grandchild that leaves its parent's session and process tree, as daemons do.
    ctr.check("run", "-d", *_pod_args(pod, "container", isolation, host_options), IMAGE, app,
              "sh", "-c", "(setsid sleep 600 &); exec sleep 600", timeout=timeout)  # fmt: skip
    ctr.wait_task_status(app, "RUNNING", timeout=timeout)
    sock = shim_socket(containerd, ctr, pod)
    assert shim_socket(containerd, ctr, app) == sock, "one shim for the pod"
    app_pid = task_pid(ctr, app)
    shim = parent_pid(app_pid) if isolation != "vm" else parent_pid(leaks.qemu_pids()[0])
    assert "containerd-shim" in Path(f"/proc/{shim}/cmdline").read_text()
    deadline = time.monotonic() + 10
    expected = {"process": 3, "host": 2, "vm": 1}[isolation]  # the pause-like init has no process on host
    while len(processes := _pod_processes([shim]) - {shim}) < expected and time.monotonic() < deadline:
        time.sleep(0.05)  # the grandchild is on its way
    assert len(processes) == expected, processes
    run_dir = qemu.run_dir_for(pod)
    assert os.path.isdir(run_dir) == (isolation == "vm")

    with ctr.events().start() as events:
        os.kill(shim, signal.SIGKILL)
        for cid in (pod, app):
            events.wait_for(lambda e, c=cid: e.topic == "/tasks/exit" and e.container_id == c, timeout=30)
    wait_until(
        lambda: ctr.task_status(app) is None and ctr.task_status(pod) is None, 30, "containerd to forget"
    )
    wait_until(lambda: not any(_alive(p) for p in processes), 15, "the pod's processes to go")
    ctr.check("container", "rm", app, pod)
    assert not leaks.qemu_pids(), "qemu outlived the shim's clean-up"
    assert not os.path.exists(run_dir), "the VM run dir outlived the shim's clean-up"
    assert not os.path.exists(sock) and not os.path.exists(sock + ".lock"), "the dead shim's socket is left"
