"""The guest's OCI runtime runs from a sealed in-memory copy (:func:`podshim.guest.runc.sealed_copy`):
nobody can write to it, and runc's and crun's CVE-2019-5736 self-check accepts it as it is, so
they stop re-executing themselves at every call (twice per call on the guest's tmpfs)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from podshim.guest import runc as guest_runc

CRUN = shutil.which("crun")


def test_the_copy_is_the_file_sealed_against_any_change(tmp_path: Path) -> None:
    src = tmp_path / "tool"
    src.write_bytes(os.urandom(3 << 20))  # more than one read's worth
    fd = guest_runc.sealed_copy(str(src))
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == guest_runc.SEALS
        assert Path(f"/proc/self/fd/{fd}").read_bytes() == src.read_bytes()
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1)
        with pytest.raises(PermissionError), open(f"/proc/self/fd/{fd}", "r+b") as f:
            f.write(b"x")
    finally:
        os.close(fd)


def _startups(path: str, pass_fds: tuple[int, ...] = ()) -> int:
    res = subprocess.run(
        [path, "--version"], env={"LD_DEBUG": "statistics", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True, pass_fds=pass_fds,
    )  # fmt: skip
    return res.stderr.count("total startup time in dynamic loader")


@pytest.mark.skipif(CRUN is None, reason="crun is not installed (scripts/setup.sh installs it)")
def test_crun_runs_once_from_the_sealed_copy() -> None:
    assert CRUN is not None
    assert _startups(CRUN) >= 2  # from its file it copies itself and executes the copy
    fd = guest_runc.sealed_copy(CRUN)
    try:
        assert _startups(f"/proc/self/fd/{fd}", (fd,)) == 1
    finally:
        os.close(fd)
