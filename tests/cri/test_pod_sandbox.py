"""The pod as a whole: several containers in one sandbox, and a sandbox that dies under them."""

from __future__ import annotations

import os
import signal
import socket
import time

from .checks import assert_one_shim, wait_no_shim
from .client import EXITED, NOTREADY, RUNNING, CriClient
from .harness import PODSHIM_HANDLER, parent_pid


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


def test_sandbox_killed_from_outside(cri: CriClient, busybox: str, handler: str, shim_binary: str) -> None:
    """SIGKILL the pause process: the pod goes NOTREADY; stop and remove still clean up fully.

    podshim kills the workloads when the sandbox exits (they joined its namespaces, and the kubelet
    will recreate the pod anyway).  runc-v2 does not: with per-container pid namespaces (the
    kubelet's default) its containers keep running until StopPodSandbox.
    """
    pod = cri.run_pod("orphaned", handler)
    ids = [cri.run_container(pod, name, ["sleep", "3600"], image=busybox) for name in ("a", "b")]
    for cid in ids:
        cri.wait_container_state(cid, RUNNING)
    shim_pid = assert_one_shim(cri, pod, shim_binary, ids)
    sandbox_pid = cri.sandbox_pid(pod.id)
    assert parent_pid(sandbox_pid) == shim_pid

    os.kill(sandbox_pid, signal.SIGKILL)
    cri.wait_pod_state(pod.id, NOTREADY)
    if handler == PODSHIM_HANDLER:
        for cid in ids:
            st = cri.wait_container_state(cid, EXITED)
            assert st.exit_code == 137, (st.exit_code, st.reason, st.message)
            assert st.finished_at > 0
    else:
        for cid in ids:
            assert cri.container_status(cid)[0].state == RUNNING

    cri.stop_pod(pod.id)
    for cid in ids:
        assert cri.container_status(cid)[0].state == EXITED
    cri.remove_pod(pod.id)
    assert cri.list_containers(pod.id) == []
    wait_no_shim(shim_binary, pod.id)


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
