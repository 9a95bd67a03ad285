"""The shim's command line, as containerd 1.6 writes it (spec §1.2: Go flag conventions)."""

from __future__ import annotations

import pytest

from podshim.shim.main import Args, UsageError, parse_args


def test_start_as_containerd_runs_it() -> None:
    argv = "-namespace k8s.io -address /run/c.sock -publish-binary /usr/bin/containerd -id abc -debug start"
    assert parse_args(argv.split()) == Args(
        namespace="k8s.io", address="/run/c.sock", publish_binary="/usr/bin/containerd", id="abc",
        debug=True, action="start",
    )  # fmt: skip


def test_delete_with_bundle_and_equals_forms() -> None:
    args = parse_args(["--namespace=ns", "-address", "a", "-id=i", "-bundle", "/b", "-debug=false", "delete"])
    assert (args.namespace, args.address, args.id, args.bundle, args.debug, args.action) == (
        "ns", "a", "i", "/b", False, "delete",
    )  # fmt: skip


def test_version_and_no_action() -> None:
    assert parse_args(["-v"]) == Args(version=True)
    assert parse_args([]).action == ""


@pytest.mark.parametrize("argv", [["-bogus", "x"], ["-id"]])
def test_bad_flags_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_args(argv)
