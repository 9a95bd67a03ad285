"""A hostile guest against the host, in a real VM: root in the guest (a privileged container that
joins the guest's root pid namespace, then its mount namespace) swaps its bundle directory in the
pod share for a symlink to a host directory on which a marker tmpfs is mounted, and plants a
symlink of its own beside it.  Whatever the guest managed, deleting the container and its VM must
leave the marker mount and its file alone (before the fix, the shim unmounted realpath() of the
swapped directory: the marker).  One VM boot.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import leaks
from harness.ctr import Ctr
from harness.poll import wait_until
from harness.runtimes import PODSHIM

from podshim.vm import image as vmimage

IMAGE = "docker.io/library/busybox:latest"
VM = "podshim.io/isolation=vm"
MARKER = "the host's own file\n"


@pytest.fixture
def marker_mount(tmp_path: Path) -> Iterator[Path]:
    """A host directory with a tmpfs and a marker file on it (the test's private mount namespace
    is the shim's and qemu's too)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "marker", str(victim)], check=True)
    try:
        (victim / "marker").write_text(MARKER)
        yield victim
    finally:
        subprocess.run(["umount", "-l", str(victim)], check=False)


def _run_guest_root(ctr: Ctr, name: str) -> None:
    """A VM container from which guest root is one nsenter away: privileged, in the guest's root
    pid namespace (whose PID 1 is the agent)."""
    try:
        vmimage.locate()
    except vmimage.ImageError as e:
        pytest.fail(f"{e}", pytrace=False)
    ctr.check(
        "run", "--runtime", PODSHIM, "--annotation", VM, "--privileged",
        "--with-ns", "pid:/proc/1/ns/pid", "-d", IMAGE, name, "sleep", "1000",
        timeout=240,
    )  # fmt: skip
    wait_until(lambda: ctr.task_status(name) == "RUNNING", 10, f"{name} RUNNING")


def test_guest_swaps_its_bundle_for_a_symlink_to_a_host_mount(ctr: Ctr, marker_mount: Path) -> None:
    _run_guest_root(ctr, "att")

    share = vmimage.GUEST_SHARED
    attack = f"""
        cd {share} || exit 99
        mv att att.moved; echo "mv: $?"
        ln -s {marker_mount} att; echo "ln: $?"
        ln -s {marker_mount} evil; echo "ln evil: $?"
        ls -la {share}
    """
    res = ctr.run(
        "task", "exec", "--exec-id", "attack", "att", "nsenter", "-t", "1", "-m", "--", "sh", "-c", attack
    )
    print(f"\nthe guest's attack:\n{res.stdout}{res.stderr}")
    assert res.rc == 0, res

    ctr.check("task", "kill", "-s", "SIGKILL", "att")
    wait_until(lambda: ctr.task_status("att") == "STOPPED", 30, "att STOPPED")
    ctr.check("task", "delete", "att")
    ctr.check("container", "delete", "att")

    assert os.path.ismount(marker_mount), "the host's marker mount was unmounted"
    assert (marker_mount / "marker").read_text() == MARKER
    assert os.listdir(marker_mount) == ["marker"]
    # The first line of defence held: the guest cannot change the tree the shim works in.
    assert "Read-only file system" in res.stderr, "the guest could write the tree the shim works in"


# Run by the guest's python (the guest layer's) in the guest's root mount namespace: take a copy of
# the agent's channel fd with pidfd_getfd(2) (the port itself opens only once) and write bytes
# that are no frame into it, then a DATA frame for a stream the shim never opened.
_BREAK_THE_CHANNEL = """
import ctypes, os, struct, zlib
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open(1)
(n,) = [int(n) for n in os.listdir("/proc/1/fd") if os.readlink(f"/proc/1/fd/{n}").startswith("/dev/vport")]
fd = libc.syscall(438, pidfd, n, 0)
assert fd >= 0, ctypes.get_errno()
os.write(fd, b"not a frame " * 100)
prefix = struct.pack(">4sIIBB", b"PSv1", 4, 999999, 5, 0)
os.write(fd, prefix + (zlib.crc32(prefix) & 0xFFFF).to_bytes(2, "big") + b"data")
print("sent")
"""


def test_guest_that_breaks_the_protocol_is_a_dead_vm(ctr: Ctr) -> None:
    """Guest root writes garbage into the agent's channel: the shim cuts the channel, the task
    exits with status 1 as for any VM death, and nothing of the VM is left."""
    _run_guest_root(ctr, "vio")
    with ctr.events() as events:
        res = ctr.run(
            "task", "exec", "--exec-id", "attack", "vio",
            "nsenter", "-t", "1", "-m", "--", "python3", "-c", _BREAK_THE_CHANNEL,
        )  # fmt: skip
        ev = events.wait_for(
            lambda e: e.topic == "/tasks/exit" and e.container_id == "vio" and e.exec_id != "attack",
            timeout=30,
        )
    print(f"\nthe guest's attack: rc={res.rc} {res.stdout}{res.stderr}")
    assert ev.payload.get("exit_status") == 1, ev
    wait_until(lambda: not leaks.qemu_pids(), 20, "qemu to go")
    wait_until(lambda: ctr.task_status("vio") == "STOPPED", 10, "vio STOPPED")
    ctr.check("task", "delete", "vio")
    ctr.check("container", "delete", "vio")
