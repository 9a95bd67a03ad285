"""runc's command line, one module for the shim's runc backend and the guest agent: the same
argv, the same reading of runc's JSON log, the same wording of failures on both sides."""

from __future__ import annotations

import json
from pathlib import Path

from podshim.backends.runc.runc import Runc
from podshim.guest import paths as guest_paths
from podshim.guest import runc as guest_runc
from podshim.system import runc_command as cmd


def test_argv_and_verbs() -> None:
    c = cmd.RuncCommand("/usr/sbin/runc", "/run/runc", "/x/log.json", systemd_cgroup=True)
    assert c.argv(*cmd.kill_args("c1", 9, all=True)) == [
        "/usr/sbin/runc", "--root", "/run/runc", "--log", "/x/log.json", "--log-format", "json",
        "--systemd-cgroup", "kill", "--all", "c1", "9",
    ]  # fmt: skip
    assert cmd.create_args("c1", "/b", "/p", console_socket="/s", no_pivot=True) == [
        "create", "--bundle", "/b", "--pid-file", "/p", "--console-socket", "/s", "--no-pivot", "c1",
    ]  # fmt: skip
    assert cmd.exec_args("c1", "/proc.json", "/p") == [
        "exec", "--process", "/proc.json", "--detach", "--pid-file", "/p", "c1",
    ]  # fmt: skip
    assert cmd.delete_args("c1", force=True) == ["delete", "--force", "c1"]
    assert cmd.parse_ps(b"[3, 4]") == [3, 4] and cmd.parse_ps(b"null") == []


def test_the_last_error_of_runcs_log_names_the_failure(tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    log.write_text(
        "\n".join(
            [
                json.dumps({"level": "error", "msg": "an older error"}),
                "not json",
                json.dumps({"level": "error", "msg": "container_linux.go: exec: no such file"}),
                json.dumps({"level": "warning", "msg": "later, not an error"}),
                json.dumps(["not", "an", "object"]),
            ]
        )
    )
    c = cmd.RuncCommand("runc", "/r", str(log))
    assert c.error_message("create", 1) == "OCI runtime create failed: container_linux.go: exec: no such file"
    assert cmd.RuncCommand("runc", "/r", str(tmp_path / "none")).error_message("kill", 2, "") == (
        "runc kill failed: exit status 2"
    )


def test_shim_and_guest_build_the_same_command(tmp_path: Path) -> None:
    # The guest's binary is crun where its layer has it: the same command line either way.
    host = Runc(guest_paths.RUNC, "/run/runc", str(tmp_path / "c1.runc.log")).command
    guest = guest_runc.command("c1")
    assert host.argv("start", "c1")[:3] == guest.argv("start", "c1")[:3]
    assert host.argv("start", "c1")[5:] == guest.argv("start", "c1")[5:]
    assert type(host) is type(guest) is cmd.RuncCommand


def test_gone_and_missing() -> None:
    assert cmd.is_gone("runc kill failed: container not running")
    assert cmd.is_gone("runc kill failed: container does not exist")
    assert cmd.is_missing("runc delete failed: container does not exist")
    assert not cmd.is_missing("runc delete failed: container not running")
    assert not cmd.is_gone("runc kill failed: permission denied")
