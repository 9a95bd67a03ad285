"""Assertions about the processes behind a pod, shared by the tests."""

from __future__ import annotations

import time

from .client import CriClient, Pod
from .harness import parent_pid, shim_servers


def assert_one_shim(cri: CriClient, pod: Pod, shim_binary: str, container_ids: list[str]) -> int:
    """Exactly one shim server for the pod, and it is the parent of the sandbox and every container."""
    servers = shim_servers(shim_binary, pod.id)
    assert len(servers) == 1, f"expected one {shim_binary} for pod {pod.id[:12]}, found {servers}"
    shim_pid = servers[0].pid
    tasks = {"sandbox": cri.sandbox_pid(pod.id)}
    tasks.update({pod.containers[c]: cri.container_pid(c) for c in container_ids})
    parents = {name: parent_pid(pid) for name, pid in tasks.items()}
    assert set(parents.values()) == {shim_pid}, f"task parents {parents}, shim {shim_pid}"
    for cid in container_ids:  # nothing was started for the containers themselves
        assert shim_servers(shim_binary, cid) == []
    return shim_pid


def wait_no_shim(shim_binary: str, pod_id: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := shim_servers(shim_binary, pod_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], f"the pod's shim is still running after RemovePodSandbox: {left}"
