"""What a pod author may ask for through CRI, from the attacker's side.  The default `podshim`
handler passes every `podshim.io/*` pod annotation through, so the annotations are the attack
surface; only the handler's options (the admin's) grant host access, a bigger VM or a host
directory.  Each refusal fails RunPodSandbox with InvalidArgument naming the option, and the
guard in conftest.py checks that nothing is left (pod, shim, process, mount, socket, cgroup,
veth, IP address)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
from harness import leaks

from podshim.backends.vm.spec import ANN_MEMORY, ANN_VCPUS

from .client import CriClient, rpc_error
from .harness import HOST_HANDLER, PODSHIM_HANDLER, CriContainerd

ISOLATION = "podshim.io/isolation"
ROOTFS_LOCATION = "podshim.io/hostprocess-rootfs-location"


def refused(
    cri: CriClient, handler: str, annotations: dict[str, str], *fragments: str, host: bool = False
) -> None:
    before = {p.id for p in cri.list_pods()}
    err = rpc_error(lambda: cri.run_pod("attacker", handler, annotations, host=host))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    for f in fragments:
        assert f in err.details(), err.details()
    assert {p.id for p in cri.list_pods()} == before, "CRI kept the refused pod"


def test_default_handler_refuses_a_host_pod(cri: CriClient) -> None:
    refused(
        cri,
        PODSHIM_HANDLER,
        {ISOLATION: "host"},
        f"'{ISOLATION}: host' is not allowed",
        'allowed_isolation = ["process", "vm"]',
        host=True,
    )


@contextmanager
def qemu_watch() -> Iterator[list[int]]:
    """Every qemu process seen while the block runs (polled; TCG boots take seconds)."""
    seen: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.02):
            seen.extend(leaks.qemu_pids())

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        yield seen
    finally:
        stop.set()
        t.join()


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({ANN_MEMORY: "16384"}, "16384 MiB exceeds the handler's limit of 256 MiB (vm.max_memory_mib"),
        ({ANN_VCPUS: "8"}, "8 exceeds the handler's limit of 1 (vm.max_vcpus"),
    ],
    ids=["memory", "vcpus"],
)
def test_an_oversized_vm_is_refused_before_qemu_starts(
    cri: CriClient, cri_containerd: CriContainerd, annotations: dict[str, str], message: str
) -> None:
    since = cri_containerd.log_size()
    with qemu_watch() as seen:
        refused(cri, PODSHIM_HANDLER, {ISOLATION: "vm", **annotations}, message)
    assert seen == [], "qemu was started for a pod that was refused"
    assert "qemu pid" not in cri_containerd.log_tail(10_000, since=since)


def test_the_host_handler_gives_nothing_but_host(cri: CriClient) -> None:
    refused(cri, HOST_HANDLER, {ISOLATION: "vm"}, f"'{ISOLATION}: vm' is not allowed", "podshim-host.toml")


def test_a_host_pod_may_not_pick_a_host_directory_outside_the_allowed_ones(
    cri: CriClient, cri_containerd: CriContainerd
) -> None:
    allowed = str(cri_containerd.host_rootfs_locations)
    refused(
        cri,
        HOST_HANDLER,
        {ROOTFS_LOCATION: "/etc"},
        f"'{ROOTFS_LOCATION}: /etc' is not under any of host.allowed_rootfs_locations = ['{allowed}']",
        host=True,
    )
