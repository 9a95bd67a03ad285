"""runc's command line, shared by the shim and the guest agent (standard library only).

This builds argv and reads runc's errors; running it is the caller's: the shim through its
asyncio reaper (:mod:`podshim.backends.runc.runc`), the agent through its reaper thread
(:mod:`podshim.guest.runc`).
"""

from __future__ import annotations

import json
from typing import NamedTuple


class RuncCommand(NamedTuple):
    binary: str
    root: str
    log: str
    systemd_cgroup: bool = False

    def argv(self, *args: str) -> list[str]:
        argv = [self.binary, "--root", self.root, "--log", self.log, "--log-format", "json"]
        if self.systemd_cgroup:
            argv.append("--systemd-cgroup")
        argv.extend(args)
        return argv

    def last_error(self) -> str:
        """The message of the last error runc wrote to its JSON log (spec §1.6)."""
        try:
            with open(self.log, "rb") as f:
                lines = f.read().splitlines()
        except OSError:
            return ""
        for line in reversed(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") == "error":
                return str(entry.get("msg", ""))
        return ""

    def error_message(self, verb: str, status: int, stderr: str = "") -> str:
        msg = self.last_error() or stderr or f"exit status {status}"
        if verb in ("create", "exec", "start", "run"):
            # The wording containerd users know from runc-v2.
            return f"OCI runtime {verb} failed: {msg}"
        return f"runc {verb} failed: {msg}"


def create_args(
    cid: str,
    bundle: str,
    pid_file: str,
    *,
    console_socket: str | None = None,
    no_pivot: bool = False,
    no_new_keyring: bool = False,
) -> list[str]:
    args = ["create", "--bundle", bundle, "--pid-file", pid_file]
    if console_socket:
        args += ["--console-socket", console_socket]
    if no_pivot:
        args.append("--no-pivot")
    if no_new_keyring:
        args.append("--no-new-keyring")
    return [*args, cid]


def exec_args(cid: str, process_json: str, pid_file: str, *, console_socket: str | None = None) -> list[str]:
    args = ["exec", "--process", process_json, "--detach", "--pid-file", pid_file]
    if console_socket:
        args += ["--console-socket", console_socket]
    return [*args, cid]


def kill_args(cid: str, signal: int, all: bool = False) -> list[str]:
    return ["kill", *(["--all"] if all else []), cid, str(signal)]


def delete_args(cid: str, force: bool = False) -> list[str]:
    return ["delete", *(["--force"] if force else []), cid]


def update_args(cid: str, resources_path: str) -> list[str]:
    return ["update", "--resources", resources_path, cid]


def ps_args(cid: str) -> list[str]:
    return ["ps", "--format", "json", cid]


def parse_ps(out: bytes) -> list[int]:
    return [int(p) for p in json.loads(out or b"[]") or []]


def is_missing(message: str) -> bool:
    """Whether a runc error says the container does not exist (any more)."""
    return "does not exist" in message


def is_gone(message: str) -> bool:
    """Whether a runc error says the container, or its init, is gone: a kill of it is moot."""
    return "not running" in message or is_missing(message)


def read_pid_file(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())
