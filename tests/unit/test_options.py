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


# -- fail closed: the handler's options are the only source of privilege --------------------------


def from_file(path: Path | str) -> options.ShimOptions:
    raw = packed(
        runtimeoptions_pb2.Options(type_url="podshim.v1.Options", config_path=str(path)),
        "runtimeoptions.v1.Options",
    )
    return options.decode(raw)


def test_a_full_options_file(tmp_path: Path) -> None:
    conf = tmp_path / "host.toml"
    conf.write_text(
        'isolation = "host"\nallowed_isolation = ["host"]\nio_uid = 5\nsystemd_cgroup = true\n'
        '[host]\nallowed_rootfs_locations = ["/var/lib/hostprocess"]\n'
        "[vm]\nmemory_mib = 512\nmax_memory_mib = 1024\n"
    )
    o = from_file(conf)
    assert (o.isolation, o.allowed_isolation, o.io_uid, o.systemd_cgroup) == ("host", ["host"], 5, True)
    assert o.host.allowed_rootfs_locations == ["/var/lib/hostprocess"]
    assert (o.vm.memory_mib, o.vm.max_memory_mib) == (512, 1024)
    assert o.source == f"handler options file {conf}"


def test_defaults_never_allow_host() -> None:
    assert "host" not in options.ShimOptions().allowed_isolation
    assert options.ShimOptions().allowed_isolation == ["process", "vm"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('isolaton = "host"\n', "unknown key 'isolaton'"),
        ("[vm]\nmemory = 512\n", "unknown key 'vm.memory'"),
        ("[hosts]\nx = 1\n", "unknown key 'hosts'"),
        ('config_path = "/etc/other.toml"\n', "unknown key 'config_path'"),
        ("isolation = 1\n", "key 'isolation' must be a string, not 1"),
        ('systemd_cgroup = "yes"\n', "key 'systemd_cgroup' must be a boolean"),
        ("io_uid = true\n", "key 'io_uid' must be a non-negative integer"),
        ("io_uid = -1\n", "key 'io_uid' must be a non-negative integer"),
        ('allowed_isolation = "host"\n', "key 'allowed_isolation' must be a list of strings"),
        ("allowed_isolation = [1]\n", "key 'allowed_isolation' must be a list of strings"),
        ('[vm]\nmax_memory_mib = "lots"\n', "key 'vm.max_memory_mib' must be a non-negative integer"),
        ('vm = "big"\n', "key 'vm' must be a table"),
        ('isolation = "root"\n', "key 'isolation' is 'root'"),
        ('allowed_isolation = ["process", "all"]\n', "key 'allowed_isolation' has 'all'"),
        ('[host]\nallowed_rootfs_locations = ["rel"]\n', "key 'host.allowed_rootfs_locations' has 'rel'"),
        ('[host]\nallowed_rootfs_locations = ["/"]\n', "host.allowed_rootfs_locations"),
        ('[host]\nallowed_rootfs_locations = ["/a/../etc"]\n', "host.allowed_rootfs_locations"),
        ("isolation = \n", "is not valid TOML"),
    ],
)
def test_a_bad_options_file_is_invalid_argument_naming_file_and_key(
    tmp_path: Path, content: str, message: str
) -> None:
    conf = tmp_path / "podshim.toml"
    conf.write_text(content)
    with pytest.raises(errdefs.InvalidArgument, match=message) as e:
        from_file(conf)
    assert str(conf) in e.value.message


def test_a_missing_or_unreadable_options_file_is_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(errdefs.InvalidArgument, match=r"missing.toml \(ConfigPath\) cannot be read"):
        from_file(tmp_path / "missing.toml")
    with pytest.raises(errdefs.InvalidArgument, match="cannot be read"):
        from_file(tmp_path)  # a directory: unreadable as a file, also for root
    with pytest.raises(errdefs.InvalidArgument, match="not an absolute path"):
        from_file("podshim.toml")  # relative to the shim's cwd, the client's bundle
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(errdefs.InvalidArgument, match="not valid TOML"):
        from_file(binary)


def test_our_own_options_carry_the_policy() -> None:
    msg = podshim_options_pb2.Options(
        isolation="host",
        allowed_isolation=["host"],
        host=podshim_options_pb2.HostOptions(allowed_rootfs_locations=["/srv/hpc"]),
        vm=podshim_options_pb2.VMOptions(max_vcpus=2),
    )
    o = options.decode(packed(msg, "podshim.v1.Options"))
    assert (o.isolation, o.allowed_isolation, o.host.allowed_rootfs_locations, o.vm.max_vcpus) == (
        "host", ["host"], ["/srv/hpc"], 2,
    )  # fmt: skip
    assert o.source == "runtime options podshim.v1.Options"
    # An empty list is proto3's "not set": the default.
    assert options.decode(packed(podshim_options_pb2.Options(), "podshim.v1.Options")).allowed_isolation == [
        "process",
        "vm",
    ]
    with pytest.raises(errdefs.InvalidArgument, match="runtime options podshim.v1.Options: key 'isolation'"):
        options.decode(packed(podshim_options_pb2.Options(isolation="hots"), "podshim.v1.Options"))


def test_bad_options_on_stdin_are_kept_for_create_to_refuse(tmp_path: Path) -> None:
    raw = packed(
        runtimeoptions_pb2.Options(config_path=str(tmp_path / "missing.toml")), "runtimeoptions.v1.Options"
    )
    o = options.decode_stdin(raw.SerializeToString())
    assert "missing.toml (ConfigPath) cannot be read" in o.problem
    assert "cannot decode" in options.decode_stdin(b"\xff\xff\xff").problem
    assert options.decode_stdin(b"").problem == ""


def test_json_round_trip_keeps_the_policy() -> None:
    o = options.ShimOptions(isolation="host", allowed_isolation=["host"], source="x")
    o.host.allowed_rootfs_locations = ["/srv"]
    assert options.ShimOptions.from_json(o.to_json()) == o
