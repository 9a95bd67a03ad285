"""What a pod may ask of its handler, from the attacker's side: a pod author writes any
annotation; only the handler's options (the node admin's) grant anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from podshim import errdefs, policy
from podshim.oci import HOSTPROCESS_ROOTFS_LOCATION, ISOLATION
from podshim.options import ShimOptions


def spec(**annotations: str) -> dict[str, object]:
    return {"annotations": annotations}


def test_default_handler_gives_process_and_lets_pods_pick_vm() -> None:
    opts = ShimOptions()
    assert policy.isolation(opts, spec()) == "process"
    assert policy.isolation(opts, spec(**{ISOLATION: "process"})) == "process"
    assert policy.isolation(opts, spec(**{ISOLATION: "vm"})) == "vm"


def test_default_handler_refuses_host_naming_the_option() -> None:
    opts = ShimOptions(source="handler options file /etc/podshim/podshim.toml")
    with pytest.raises(errdefs.InvalidArgument) as e:
        policy.isolation(opts, spec(**{ISOLATION: "host"}))
    msg = e.value.message
    assert "'podshim.io/isolation: host' is not allowed" in msg
    assert "/etc/podshim/podshim.toml" in msg and 'allowed_isolation = ["process", "vm"]' in msg
    assert 'handler of their own whose admin set isolation = "host"' in msg


def test_no_runtime_options_is_the_defaults_and_says_so() -> None:
    with pytest.raises(errdefs.InvalidArgument, match="default options"):
        policy.isolation(ShimOptions(), spec(**{ISOLATION: "host"}))


def test_the_handler_is_named_when_cri_says_which() -> None:
    with pytest.raises(errdefs.InvalidArgument, match="runtime handler 'podshim'"):
        policy.isolation(ShimOptions(), spec(**{ISOLATION: "host", policy.RUNTIME_HANDLER: "podshim"}))


def test_admin_host_handler() -> None:
    opts = ShimOptions(isolation="host", allowed_isolation=["host"])
    assert policy.isolation(opts, spec()) == "host"
    assert policy.isolation(opts, spec(**{ISOLATION: "host"})) == "host"
    with pytest.raises(errdefs.InvalidArgument, match="'podshim.io/isolation: vm' is not allowed"):
        policy.isolation(opts, spec(**{ISOLATION: "vm"}))


def test_a_handler_may_forbid_every_choice() -> None:
    opts = ShimOptions(isolation="vm", allowed_isolation=[])
    assert policy.isolation(opts, spec(**{ISOLATION: "vm"})) == "vm"  # its own mode grants nothing
    with pytest.raises(errdefs.InvalidArgument, match=r"allowed_isolation = \[\]"):
        policy.isolation(opts, spec(**{ISOLATION: "process"}))


def test_unknown_modes_are_refused() -> None:
    with pytest.raises(errdefs.InvalidArgument, match="'podshim.io/isolation: root' is not allowed"):
        policy.isolation(ShimOptions(), spec(**{ISOLATION: "root"}))


# -- hostprocess-rootfs-location ------------------------------------------------------------------


def test_rootfs_location_refused_without_a_configured_prefix() -> None:
    with pytest.raises(errdefs.InvalidArgument, match="sets no host.allowed_rootfs_locations"):
        policy.host_rootfs_location(ShimOptions(), spec(**{HOSTPROCESS_ROOTFS_LOCATION: "/etc"}))
    assert policy.host_rootfs_location(ShimOptions(), spec()) == ""


def test_rootfs_location_only_under_an_allowed_prefix(tmp_path: Path) -> None:
    allowed = tmp_path / "hpc"
    (allowed / "pods").mkdir(parents=True)
    opts = ShimOptions()
    opts.host.allowed_rootfs_locations = [str(allowed)]
    ok = str(allowed / "pods")
    assert policy.host_rootfs_location(opts, spec(**{HOSTPROCESS_ROOTFS_LOCATION: ok})) == ok
    assert policy.host_rootfs_location(opts, spec(**{HOSTPROCESS_ROOTFS_LOCATION: ok + "/"})) == ok
    top = str(allowed)
    assert policy.host_rootfs_location(opts, spec(**{HOSTPROCESS_ROOTFS_LOCATION: top})) == top
    (allowed / "escape").symlink_to("/etc")
    for bad, why in [
        ("/etc", "is not under any of"),
        (str(tmp_path / "hpc-sibling"), "is not under any of"),
        (f"{allowed}/../../etc", "not a normalised absolute path"),
        ("relative/dir", "not a normalised absolute path"),
        (str(allowed / "escape"), "is not under any of"),  # a symlink out of the prefix
    ]:
        with pytest.raises(errdefs.InvalidArgument, match=why):
            policy.host_rootfs_location(opts, spec(**{HOSTPROCESS_ROOTFS_LOCATION: bad}))
