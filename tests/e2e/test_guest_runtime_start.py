"""The agent's start of a created container (:func:`podshim.guest.runc.start`), which for crun
writes the container's exec fifo itself instead of running ``crun start``, against the host's
real crun: the container runs its process, crun calls it running, and a container whose init is
gone gets an error instead of a start that never returns."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from harness.guest_bundle import busybox_bundle
from harness.poll import wait_until

from podshim.guest import runc as guest_runc
from podshim.guest.runc import RuncError

CRUN = "/usr/bin/crun"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(CRUN) or not shutil.which("runc"),
    reason="needs root, crun (installed by scripts/setup.sh) and runc (for `runc spec`)",
)


@pytest.fixture
def crun_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "state"
    root.mkdir()
    monkeypatch.setattr(guest_runc, "RUNC", CRUN)
    monkeypatch.setattr(guest_runc, "RUNC_ROOT", str(root))
    return root


def _crun(root: Path, *args: str, errors: Path | None = None) -> subprocess.CompletedProcess[str]:
    # crun refuses a hybrid cgroup hierarchy (this machine kind's): it runs where /sys/fs/cgroup
    # is cgroup2 alone, in a mount namespace of its own, and makes no cgroup (the fifo needs none).
    crun = [CRUN, "--root", str(root), "--cgroup-manager=disabled", *args]
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t cgroup2 none /sys/fs/cgroup && exec "$@"', "sh", *crun]  # fmt: skip
    if errors is not None:  # the container inherits its stdio: no pipe that stays open
        with errors.open("w") as err:
            null = subprocess.DEVNULL
            return subprocess.run(argv, stdin=null, stdout=err, stderr=err, text=True, timeout=30)
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def _create(root: Path, share: Path, cid: str, args: list[str]) -> int:
    busybox_bundle(share, cid, args)
    pid_file = share / f"{cid}.pid"
    errors = share / f"{cid}.err"
    res = _crun(root, "create", "--bundle", str(share / cid), "--pid-file", str(pid_file), cid, errors=errors)
    assert res.returncode == 0, errors.read_text()
    return int(pid_file.read_text())


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _status(root: Path, cid: str) -> str:
    return str(json.loads(_crun(root, "state", cid).stdout)["status"])


def test_start_writes_the_exec_fifo_as_crun_start_does(crun_root: Path, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    _create(crun_root, share, "s1", ["sh", "-c", "echo ran; sleep 30"])
    assert _status(crun_root, "s1") == "created"
    try:
        guest_runc.start("s1")
        assert _status(crun_root, "s1") == "running"
        output = share / "s1.err"  # the container's stdout: create's, inherited
        wait_until(lambda: "ran" in output.read_text(), 10, "the container's process to run")
        assert not (crun_root / "s1" / "exec.fifo").exists()
    finally:
        _crun(crun_root, "delete", "--force", "s1")


def test_start_of_a_container_whose_init_is_gone_fails_at_once(crun_root: Path, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    pid = _create(crun_root, share, "s2", ["sleep", "30"])
    try:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: _dead(pid), 10, "the init to die")
        t0 = time.monotonic()
        with pytest.raises(RuncError, match="start failed"):
            guest_runc.start("s2")
        assert time.monotonic() - t0 < 5
    finally:
        _crun(crun_root, "delete", "--force", "s2")
