"""containerd's identifier rules for every id a client hands the shim (attacker's side: ids that
would become paths outside the bundle, or collide with the init's files)."""

from __future__ import annotations

import os

import pytest

from podshim import errdefs, ids, oci


@pytest.mark.parametrize(
    "value",
    ["a", "Z9", "abc-def_ghi.jkl", "0" * 64, "x" * 76, "k8s.io", "a-b-c"],
)
def test_valid_ids(value: str) -> None:
    assert ids.problem(value) == ""
    assert ids.check_task_id(value) == value


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "must not be empty"),
        ("x" * 77, "77 characters long"),
        ("x" * 300, "300 characters long"),
        ("../x", "separator"),
        ("a/b", "character '/'"),
        ("..", "separator"),
        (".hidden", "separator"),
        ("trailing-", "ends with a separator"),
        ("a..b", "next to another"),
        ("a b", "character ' '"),
        ("a\nb", "character '\\n'"),
        ("a\0b", "character '\\x00'"),
        ("é", "character 'é'"),
    ],
)
def test_invalid_ids_are_invalid_argument(value: str, why: str) -> None:
    assert why in ids.problem(value)
    with pytest.raises(errdefs.InvalidArgument, match="task id .* is not a valid identifier"):
        ids.check_task_id(value)


def test_exec_ids() -> None:
    assert ids.check_exec_id("") == ""  # the init process
    assert ids.check_exec_id("e1") == "e1"
    with pytest.raises(errdefs.InvalidArgument, match="reserved for the container's init"):
        ids.check_exec_id("init")
    for bad in ("../x", "x" * 300, "a/b"):
        with pytest.raises(errdefs.InvalidArgument, match="exec id"):
            ids.check_exec_id(bad)


def test_long_ids_are_shortened_in_the_message() -> None:
    with pytest.raises(errdefs.InvalidArgument) as e:
        ids.check_exec_id("y" * 300)
    assert len(e.value.message) < 200


@pytest.mark.parametrize("annotation", [oci.RUNC_GROUP, oci.SANDBOX_ID])
def test_grouping_key_from_annotations_is_checked(annotation: str) -> None:
    spec = {"annotations": {annotation: "../../run"}}
    with pytest.raises(errdefs.InvalidArgument, match=f"annotation '{annotation}'"):
        oci.grouping_key(spec, "c1")
    assert oci.grouping_key({"annotations": {annotation: "pod-1"}}, "c1") == "pod-1"


def test_grouping_key_without_annotations_is_the_checked_task_id() -> None:
    assert oci.grouping_key({}, "c1") == "c1"
    with pytest.raises(errdefs.InvalidArgument, match="task id"):
        oci.grouping_key({}, "../c1")


def test_exec_pid_files_have_a_name_space_of_their_own() -> None:
    from podshim.backends.runc.backend import exec_pid_file

    names = {os.path.basename(exec_pid_file("/b", eid)) for eid in ("init", "exec-init", "x")}
    assert "init.pid" not in names and len(names) == 3
    assert os.path.dirname(exec_pid_file("/b", "x")) == "/b"
