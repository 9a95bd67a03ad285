"""What the `delete` action cleans after a killed shim: a host process's cgroup, from a record
that names container cgroups and nothing else; a VM pod's qemu and run dir."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from podshim.system import cgroups
from podshim.system.cgroups import CGROUP_ROOT, Cgroup
from podshim.vm import qemu


@pytest.mark.parametrize(
    "cg",
    [
        Cgroup({}, f"{CGROUP_ROOT}/k8s.io/c1"),
        Cgroup({"memory": f"{CGROUP_ROOT}/memory/ns/c1", "pids": f"{CGROUP_ROOT}/pids/ns/c1"}, None),
    ],
)
def test_a_container_cgroup_round_trips(cg: Cgroup) -> None:
    assert cgroups.from_record(cgroups.to_record(cg)) == cg


@pytest.mark.parametrize(
    "record",
    [
        {"v1": {}, "v2": CGROUP_ROOT},  # the whole hierarchy
        {"v1": {}, "v2": f"{CGROUP_ROOT}/../../etc"},
        {"v1": {}, "v2": "/etc/ssh"},
        {"v1": {"memory": f"{CGROUP_ROOT}/memory"}, "v2": None},  # a controller's root
        {"v1": {"memory": f"{CGROUP_ROOT}/pids/x"}, "v2": None},  # another controller's dir
        {"v1": {"../..": f"{CGROUP_ROOT}/../../x"}, "v2": None},
        {"v1": {"memory": f"{CGROUP_ROOT}/memory/a/../../../x"}, "v2": None},
        {"v1": [], "v2": None},
        "not a record",
    ],
)
def test_anything_else_is_refused(record: object) -> None:
    with pytest.raises(ValueError):
        cgroups.from_record(record)


def test_a_lingering_qemu_of_a_dead_shim_is_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PDEATHSIG has not finished qemu yet when containerd runs `delete`: while the pod's shim
    lives, its VM stays; once it is gone, qemu is killed and the run dir removed."""
    monkeypatch.setenv(qemu.RUN_ROOT_ENV, str(tmp_path / "vm"))
    fake = tmp_path / "qemu-system-x86_64"  # /proc/<pid>/exe is what the clean-up checks
    shutil.copy("/bin/sleep", fake)
    vm = subprocess.Popen([str(fake), "600"])
    try:
        run_dir = Path(qemu.run_dir_for("pod"))
        run_dir.mkdir(parents=True)
        (run_dir / "qemu.pid").write_text(str(vm.pid))
        qemu.clean_up_after_shim("pod", "c1", shim_gone=False)
        assert vm.poll() is None and run_dir.exists(), "a live shim's VM was touched"
        qemu.clean_up_after_shim("pod", "c1", shim_gone=True)
        assert vm.wait(timeout=10) == -9
        assert not run_dir.exists()
    finally:
        vm.kill()
        vm.wait()
