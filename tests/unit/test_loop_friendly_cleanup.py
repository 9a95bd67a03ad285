"""Cleanup that runs on the shim's only loop: cgroup removal waits without blocking it, and an
unmount batch parses mountinfo once."""

from __future__ import annotations

import asyncio
import ctypes
import os
from pathlib import Path

import pytest

from podshim.system import cgroups, mounts
from podshim.system.cgroups import Cgroup

BOUND = 5.0


async def test_cgroup_removal_retries_without_blocking_the_loop(tmp_path: Path) -> None:
    """The defect: time.sleep between rmdir attempts (up to ~3 s on v1) froze the shim.  Here
    the directory only becomes removable once another coroutine has run."""
    d = tmp_path / "cg"
    d.mkdir()
    (d / "busy").write_text("a process still leaving")

    async def the_kernel_catches_up() -> None:
        await asyncio.sleep(0.05)
        (d / "busy").unlink()

    catching_up = asyncio.ensure_future(the_kernel_catches_up())
    await asyncio.wait_for(cgroups.remove(Cgroup({}, str(d)), attempts=100, pause=0.01), BOUND)
    await catching_up
    assert not d.exists()


async def test_cgroup_removal_gives_up_with_the_error(tmp_path: Path) -> None:
    d = tmp_path / "cg"
    d.mkdir()
    (d / "stuck").write_text("")
    with pytest.raises(OSError):
        await cgroups.remove(Cgroup({}, str(d)), attempts=3, pause=0)


def _can_mount() -> bool:
    return os.geteuid() == 0 and os.environ.get("PODSHIM_TEST_NS") == "1"


@pytest.mark.skipif(not _can_mount(), reason="needs root in the test session's private mount namespace")
def test_an_unmount_batch_parses_mountinfo_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The defect: up to 64 full mountinfo parses per unmount.  Stacked and nested mounts all
    go with one parse."""
    libc = ctypes.CDLL(None, use_errno=True)
    root = tmp_path / "rootfs"
    root.mkdir()
    for _ in range(3):  # three mounts stacked on one point
        assert libc.mount(b"tmpfs", str(root).encode(), b"tmpfs", 0, None) == 0
    for sub in ("a", "a/b", "c"):
        (root / sub).mkdir()
        assert libc.mount(b"tmpfs", str(root / sub).encode(), b"tmpfs", 0, None) == 0
    parses = 0
    real = mounts._mount_points

    def counted() -> list[str]:
        nonlocal parses
        parses += 1
        return real()

    monkeypatch.setattr(mounts, "_mount_points", counted)
    mounts.unmount_all(str(root))
    assert parses == 1
    left = [p for p in real() if p == str(root) or p.startswith(f"{root}/")]
    assert left == []


async def test_off_loop_keeps_the_loop_running_and_a_cancelled_caller_waits_for_the_call() -> None:
    import threading

    from podshim.system.blocking import off_loop

    release = threading.Event()
    finished = threading.Event()

    def slow() -> int:
        release.wait(BOUND)
        finished.set()
        return 7

    calling = asyncio.ensure_future(off_loop(slow))
    for _ in range(3):
        await asyncio.sleep(0)  # the loop runs while the call blocks its thread
    assert not calling.done()
    calling.cancel()
    await asyncio.sleep(0)
    assert not calling.done()  # cancelled, but still waiting for the call to end
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(calling, BOUND)
    assert finished.is_set()
    assert await off_loop(lambda: 3) == 3
