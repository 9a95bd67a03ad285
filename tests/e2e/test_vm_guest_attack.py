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


def test_guest_swaps_its_bundle_for_a_symlink_to_a_host_mount(ctr: Ctr, marker_mount: Path) -> None:
    try:
        vmimage.locate()
    except vmimage.ImageError as e:
        pytest.fail(f"{e}", pytrace=False)
    ctr.check(
        "run", "--runtime", PODSHIM, "--annotation", VM, "--privileged",
        "--with-ns", "pid:/proc/1/ns/pid", "-d", IMAGE, "att", "sleep", "1000",
        timeout=240,
    )  # fmt: skip
    wait_until(lambda: ctr.task_status("att") == "RUNNING", 10, "att RUNNING")

    share = vmimage.GUEST_SHARED
    attack = f"""
        cd {share} || exit 99
        mv att att.moved; echo "mv: $?"
        ln -s {marker_mount} att; echo "ln: $?"
        ln -s {marker_mount} evil; echo "ln evil: $?"
        ls -la {share}
    """
    # Guest root: the agent is PID 1 of the pid namespace this container joined.
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
