"""The record the `delete` action trusts to kill and remove a host process's cgroup: it names
cgroup directories of containers and nothing else."""

from __future__ import annotations

import pytest

from podshim.system import cgroups
from podshim.system.cgroups import CGROUP_ROOT, Cgroup


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
