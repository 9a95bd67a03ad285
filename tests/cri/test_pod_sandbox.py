"""The pod as a whole: several containers in one sandbox, and a sandbox that dies under them."""

from __future__ import annotations

import os
import signal
import socket
import time

import grpc  # type: ignore[import-untyped]
from harness.poll import wait_until

from .checks import assert_one_shim, wait_no_shim
from .client import EXITED, NOTREADY, RUNNING, CriClient
from .harness import PODSHIM_HANDLER, CriContainerd, parent_pid, shim_servers


def test_pod_with_three_containers_sharing_pids(
    cri: CriClient, busybox: str, handler: str, shim_binary: str
) -> None:
    """shareProcessNamespace: the sandbox's /pause is pid 1 of every container."""
    pod = cri.run_pod("trio", handler, share_pid=True)
    ids = [cri.run_container(pod, f"c{i}", ["sleep", f"360{i}"], image=busybox) for i in range(3)]
    for cid in ids:
        cri.wait_container_state(cid, RUNNING)
    assert_one_shim(cri, pod, shim_binary, ids)

    for cid in ids:
        assert cri.exec_sync(cid, ["cat", "/proc/1/cmdline"]).stdout == "/pause\0"
    seen = cri.exec_sync(ids[0], ["ps", "-o", "pid,args"]).stdout
    for i in range(3):
        assert f"sleep 360{i}" in seen, seen

    # Straight to StopPodSandbox with everything running: CRI kills the containers, then the sandbox.
    cri.stop_pod(pod.id)
    for cid in ids:
        st = cri.container_status(cid)[0]
        assert (st.state, st.exit_code) == (EXITED, 137)
    cri.remove_pod(pod.id)
    assert cri.list_containers(pod.id) == []
    wait_no_shim(shim_binary, pod.id)


def test_sandbox_killed_from_outside(
    cri: CriClient, cri_containerd: CriContainerd, busybox: str, handler: str, shim_binary: str
) -> None:
    """SIGKILL the pause process: the pod goes NOTREADY, and its containers, each with a pid
    namespace of its own (the kubelet's default), keep running and stay RUNNING to CRI, as with
    runc-v2, also across a containerd restart (CRI's recovery); stop and remove then clean up
    fully."""
    pod = cri.run_pod("orphaned", handler)
    ids = [cri.run_container(pod, name, ["sleep", "3600"], image=busybox) for name in ("a", "b")]
    for cid in ids:
        cri.wait_container_state(cid, RUNNING)
    shim_pid = assert_one_shim(cri, pod, shim_binary, ids)
    sandbox_pid = cri.sandbox_pid(pod.id)
    assert parent_pid(sandbox_pid) == shim_pid
    pids = {cid: cri.container_pid(cid) for cid in ids}

    os.kill(sandbox_pid, signal.SIGKILL)
    cri.wait_pod_state(pod.id, NOTREADY)

    def still_running() -> None:
        for cid, pid in pids.items():
            assert cri.container_status(cid)[0].state == RUNNING
            assert os.path.exists(f"/proc/{pid}")
        assert cri.exec_sync(ids[0], ["echo", "alive"]).stdout == "alive\n"

    still_running()
    # CRI's handling of the sandbox's exit ends with deleting its task (and bundle): after that,
    # nothing of the exit is still on its way to the containers.
    wait_until(lambda: not cri_containerd.bundle(pod.id).exists(), 30, "CRI to delete the sandbox task")
    still_running()
    cri_containerd.restart()
    wait_until(lambda: _cri_ready(cri), 30, "CRI to recover")
    assert cri.pod_status(pod.id)[0].state == NOTREADY
    still_running()
    assert shim_servers(shim_binary, pod.id)[0].pid == shim_pid

    cri.stop_pod(pod.id)
    for cid in ids:
        assert cri.container_status(cid)[0].state == EXITED
    cri.remove_pod(pod.id)
    assert cri.list_containers(pod.id) == []
    wait_no_shim(shim_binary, pod.id)


def _cri_ready(cri: CriClient) -> bool:
    try:
        cri.list_pods()
        return True
    except grpc.RpcError:
        return False


def test_pod_shim_killed(cri: CriClient, busybox: str, handler: str, shim_binary: str) -> None:
    """SIGKILL the pod's shim: CRI's Wait fails, so it records exit code 255 for the running
    containers (spec §1.7); containerd runs our `delete` for each task, which kills them; stop and
    remove then clean up fully."""
    pod = cri.run_pod("shimless", handler)
    cid = cri.run_container(pod, "app", ["sleep", "3600"], image=busybox)
    cri.wait_container_state(cid, RUNNING)
    shim_pid = assert_one_shim(cri, pod, shim_binary, [cid])
    app_pid = cri.container_pid(cid)

    os.kill(shim_pid, signal.SIGKILL)
    st = cri.wait_container_state(cid, EXITED)
    assert st.exit_code == 255, (st.exit_code, st.reason, st.message)
    cri.wait_pod_state(pod.id, NOTREADY)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{app_pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{app_pid}"), "the container outlived its shim's cleanup"
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
    wait_no_shim(shim_binary, pod.id)
    if handler != PODSHIM_HANDLER:
        _remove_dead_sockets("/run/containerd/s")  # runc-v2 leaves its killed shim's socket; we don't


def _remove_dead_sockets(directory: str) -> None:
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        path = os.path.join(directory, name)
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
            except OSError:
                os.unlink(path)
