"""A host-process pod through containerd's CRI plugin: the admin's `podshim-host` handler (its
options file says `isolation = "host"`) makes the sandbox a task with no process and every
container a plain host process.  The pod needs no annotation; on the default handler the
annotation alone is refused (test_trust_boundaries.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .checks import wait_no_shim
from .client import EXITED, RUNNING, CriClient
from .harness import HOST_HANDLER, SHIM_BINARIES, CriContainerd, parent_pid


def test_host_process_pod(
    cri: CriClient, cri_containerd: CriContainerd, busybox: str, tmp_path: Path
) -> None:
    shim_binary = SHIM_BINARIES[HOST_HANDLER]
    # Mounted where the admin allows it: the handler's host.allowed_rootfs_locations.
    location = cri_containerd.host_rootfs_locations / "pods"
    pod = cri.run_pod(
        "hostprocess", HOST_HANDLER, {"podshim.io/hostprocess-rootfs-location": str(location)}, host=True
    )
    sandbox_pid = cri.sandbox_pid(pod.id)
    # No pause process: the sandbox's pid is the shim's own.
    assert "containerd-shim-podshim-v1" in Path(f"/proc/{sandbox_pid}/cmdline").read_text()

    marker = tmp_path / "from-the-container"
    writer = cri.run_container(
        pod, "writer", ["sh", "-c", f"echo written by $CONTAINER_SANDBOX_MOUNT_POINT > {marker}; sleep 3600"],
        image=busybox,
    )  # fmt: skip
    viewer = cri.run_container(pod, "viewer", ["sleep", "3600"], image=busybox)
    for cid in (writer, viewer):
        cri.wait_container_state(cid, RUNNING)
        assert parent_pid(cri.container_pid(cid)) == sandbox_pid, "one shim serves the pod"

    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.read_text().startswith(f"written by {location}/"), "the container wrote a file on the host"

    # The node's namespaces.  The node's network here is the one the harness confines containerd
    # (and so CNI) to, which the shim inherits: compare with the shim's.
    viewer_pid = cri.container_pid(viewer)
    for kind, node in (("net", sandbox_pid), ("pid", "self"), ("ipc", "self")):
        assert os.readlink(f"/proc/{viewer_pid}/ns/{kind}") == os.readlink(f"/proc/{node}/ns/{kind}"), kind
    seen = cri.exec_sync(viewer, ["sh", "-c", "cat /proc/net/dev; cat /proc/1/comm"])
    assert seen.exit_code == 0
    node_links = {
        line.split(":")[0].strip()
        for line in Path(f"/proc/{sandbox_pid}/net/dev").read_text().splitlines()[2:]
    }
    assert node_links and all(f"{link}:" in seen.stdout for link in node_links), seen.stdout
    assert seen.stdout.split()[-1] == Path("/proc/1/comm").read_text().strip(), "the node's pid 1"

    res = cri.exec_sync(writer, ["sh", "-c", "echo out; exit 4"])
    assert (res.stdout, res.exit_code) == ("out\n", 4)

    cri.stop_container(viewer, timeout=1)
    assert cri.container_status(viewer)[0].state == EXITED
    cri.stop_pod(pod.id)
    st = cri.container_status(writer)[0]
    assert st.state == EXITED and st.exit_code == 137
    cri.remove_pod(pod.id)
    wait_no_shim(shim_binary, pod.id)
