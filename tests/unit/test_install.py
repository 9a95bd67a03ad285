"""`podshim install`: two handlers, each with an options file the shim accepts, and the policy
those files give (the default handler never grants host)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from google.protobuf import any_pb2

from podshim import errdefs, options, policy
from podshim.api import runtimeoptions_pb2
from podshim.cli import install as installing
from podshim.cli.main import cli
from podshim.oci import ISOLATION


def load(path: Path) -> options.ShimOptions:
    msg = runtimeoptions_pb2.Options(config_path=str(path))
    return options.decode(any_pb2.Any(type_url="runtimeoptions.v1.Options", value=msg.SerializeToString()))


def test_print_shows_both_handlers_with_their_runtime_classes() -> None:
    out = CliRunner().invoke(cli, ["install", "--print"]).output
    for name in ("podshim", "podshim-host"):
        assert f"containerd.runtimes.{name}]" in out
        assert f'ConfigPath = "/etc/podshim/{name}.toml"' in out
        assert f"  name: {name}\nhandler: {name}\n" in out
    assert 'isolation = "host"\nallowed_isolation = ["host"]' in out


def test_the_handlers_options_files_give_the_intended_policy(tmp_path: Path) -> None:
    host_pod = {"annotations": {ISOLATION: "host"}}
    default = tmp_path / "podshim.toml"
    default.write_text(installing.default_handler().options)
    opts = load(default)
    assert policy.isolation(opts, {}) == "process"
    assert policy.isolation(opts, {"annotations": {ISOLATION: "vm"}}) == "vm"
    with pytest.raises(errdefs.InvalidArgument, match=str(default)):
        policy.isolation(opts, host_pod)

    host = tmp_path / "podshim-host.toml"
    host.write_text(installing.host_handler(rootfs_locations=("/var/lib/hp",)).options)
    opts = load(host)
    assert policy.isolation(opts, {}) == "host"
    assert policy.isolation(opts, host_pod) == "host"
    assert opts.host.allowed_rootfs_locations == ["/var/lib/hp"]
    with pytest.raises(errdefs.InvalidArgument, match="allowed_isolation"):
        policy.isolation(opts, {"annotations": {ISOLATION: "process"}})


def test_install_writes_both_handlers_once(tmp_path: Path) -> None:
    config, bin_dir, opts_dir = tmp_path / "config.toml", tmp_path / "bin", tmp_path / "etc"
    bin_dir.mkdir()
    args = ["install", "--config", str(config), "--bin-dir", str(bin_dir), "--options-dir", str(opts_dir)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    text = config.read_text()
    assert text.count("runtimes.podshim]") == 1 and text.count("runtimes.podshim-host]") == 1
    assert f'ConfigPath = "{opts_dir}/podshim-host.toml"' in text
    (opts_dir / "podshim-host.toml").write_text("# edited by the admin\n")
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert config.read_text() == text, "a second install changes nothing"
    assert (opts_dir / "podshim-host.toml").read_text() == "# edited by the admin\n"
    assert (bin_dir / installing.BINARY).is_symlink()
