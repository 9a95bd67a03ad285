"""Every form of runtime options containerd sends, decoded into one ShimOptions."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import any_pb2

from podshim import errdefs, options
from podshim.api import podshim_options_pb2, runc_legacy_pb2, runc_options_pb2, runtimeoptions_pb2


def packed(msg: object, url: str) -> any_pb2.Any:
    return any_pb2.Any(type_url=url, value=msg.SerializeToString())  # type: ignore[attr-defined]


def test_runc_options() -> None:
    raw = packed(
        runc_options_pb2.Options(
            binary_name="/usr/sbin/runc", root="/run/other", systemd_cgroup=True, io_uid=7, io_gid=8,
            shim_cgroup="/shims", no_pivot_root=True,
        ),
        "containerd.runc.v1.Options",
    )  # fmt: skip
    o = options.decode(raw)
    assert (o.binary_name, o.root, o.systemd_cgroup, o.io_uid, o.io_gid, o.shim_cgroup, o.no_pivot_root) == (
        "/usr/sbin/runc", "/run/other", True, 7, 8, "/shims", True,
    )  # fmt: skip


def test_legacy_create_options() -> None:
    raw = packed(
        runc_legacy_pb2.CreateOptions(shim_cgroup="/legacy", io_uid=3, io_gid=4),
        "containerd.linux.runc.CreateOptions",
    )
    o = options.decode(raw)
    assert (o.shim_cgroup, o.io_uid, o.io_gid) == ("/legacy", 3, 4)


def test_runtimeoptions_reads_the_handler_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "podshim.toml"
    conf.write_text('binary_name = "/opt/runc"\nisolation = "host"\n[vm]\nmemory_mib = 256\n')
    raw = packed(
        runtimeoptions_pb2.Options(type_url="podshim.v1.Options", config_path=str(conf)),
        "type.googleapis.com/runtimeoptions.v1.Options",
    )
    o = options.decode(raw)
    assert (o.binary_name, o.isolation, o.vm.memory_mib, o.config_path) == (
        "/opt/runc",
        "host",
        256,
        str(conf),
    )


def test_our_own_options() -> None:
    msg = podshim_options_pb2.Options(isolation="process", root="/r")
    o = options.decode(packed(msg, "podshim.v1.Options"))
    assert (o.isolation, o.root) == ("process", "/r")


def test_unknown_type_is_invalid_argument() -> None:
    with pytest.raises(errdefs.InvalidArgument, match="unsupported runtime options"):
        options.decode(any_pb2.Any(type_url="example.com/Nope", value=b""))


def test_garbage_is_invalid_argument() -> None:
    with pytest.raises(errdefs.InvalidArgument, match="cannot decode"):
        options.decode(any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\xff\xff\xff"))


def test_no_options_and_stdin_forms() -> None:
    assert options.decode(None) == options.ShimOptions()
    assert options.decode_stdin(b"") == options.ShimOptions()
    raw = packed(runc_options_pb2.Options(root="/x"), "containerd.runc.v1.Options")
    assert options.decode_stdin(raw.SerializeToString()).root == "/x"


def test_json_round_trip_for_the_delete_action() -> None:
    o = options.ShimOptions(root="/r", binary_name="b", io_uid=1)
    o.vm.vcpus = 2
    assert options.ShimOptions.from_json(o.to_json()) == o
