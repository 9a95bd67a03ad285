"""The host-process gate on its own (no containerd): spawned held, released to exec in place, its
errors reported at release, dropped without running, and nothing of the spawner in the workload."""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from podshim import errdefs
from podshim.backends.host import launch
from podshim.system.reaper import REAPER

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the gate changes uid and rlimits: needs root")


@pytest.fixture
async def reaper() -> AsyncIterator[None]:
    REAPER.install(asyncio.get_running_loop())
    try:
        yield
    finally:
        REAPER.uninstall()


async def _held(held: launch.Held, timeout: float = 30) -> None:
    """Until the gate blocks reading fd 4 (`read` is syscall 0 on x86-64)."""
    async with asyncio.timeout(timeout):
        while not held.exited.done():
            try:
                if Path(f"/proc/{held.pid}/syscall").read_text().startswith("0 0x4 "):
                    return
            except OSError:
                pass
            await asyncio.sleep(0.005)
    raise AssertionError(f"the gate exited before release: {held.exited.result()}")


def _spec(cwd: Path, script: str) -> launch.LaunchSpec:
    env = {"PATH": "/usr/bin:/bin", "OUT": str(cwd / "out")}
    return launch.LaunchSpec(args=["/bin/sh", "-c", script], env=env, cwd=str(cwd))


async def test_released_it_execs_in_place_as_a_fresh_process(reaper: None, tmp_path: Path) -> None:
    script = (
        "id -u; id -g; id -G; pwd; ulimit -n; ls /proc/self/fd | wc -l;"
        " grep -E '^Sig(Blk|Ign)' /proc/self/status; echo $$"
    )
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        held = launch.spawn_held(
            launch.LaunchSpec(
                args=["/bin/sh", "-c", script], env={"PATH": "/usr/bin:/bin"}, cwd="/",
                uid=65534, gid=65534, additional_gids=[65534, 100],
                rlimits=[(resource.RLIMIT_NOFILE, 321, 654)], stdio=(null, out_w, out_w),
            )
        )  # fmt: skip
    finally:
        os.close(out_w)
        os.close(null)
    await _held(held)
    await held.release()
    ex = await asyncio.wait_for(held.exited, 30)
    with os.fdopen(out_r) as f:
        out = f.read().split("\n")
    assert ex.status == 0, out
    assert out[:3] == ["65534", "65534", "65534 100"]
    assert out[3] == "/"
    assert out[4] == "321"
    assert out[5] == "4"  # 0, 1, 2 and the one `ls` opened to list them
    assert out[6:8] == ["SigBlk:\t0000000000000000", "SigIgn:\t0000000000000000"]
    assert out[8] == str(held.pid), "the workload has the pid the gate had"


async def test_nothing_runs_before_release(reaper: None, tmp_path: Path) -> None:
    held = launch.spawn_held(_spec(tmp_path, 'touch "$OUT"'))
    await _held(held)
    assert not (tmp_path / "out").exists()
    await held.release()
    assert (await asyncio.wait_for(held.exited, 30)).status == 0
    assert (tmp_path / "out").exists()


async def test_an_exec_failure_is_reported_at_release(reaper: None, tmp_path: Path) -> None:
    spec = launch.LaunchSpec(args=["/no/such/binary"], env={}, cwd=str(tmp_path))
    held = launch.spawn_held(spec)
    with pytest.raises(errdefs.ShimError, match="exec /no/such/binary: .*No such file or directory"):
        await held.release()
    assert (await asyncio.wait_for(held.exited, 30)).status == 127


async def test_a_bad_working_directory_is_reported_at_release(reaper: None, tmp_path: Path) -> None:
    held = launch.spawn_held(_spec(tmp_path / "missing", "true"))
    with pytest.raises(errdefs.ShimError, match="No such file or directory"):
        await held.release()


async def test_dropped_it_never_runs(reaper: None, tmp_path: Path) -> None:
    held = launch.spawn_held(_spec(tmp_path, 'touch "$OUT"'))
    await _held(held)
    held.abandon()
    assert (await asyncio.wait_for(held.exited, 30)).status == 0
    assert not (tmp_path / "out").exists()
