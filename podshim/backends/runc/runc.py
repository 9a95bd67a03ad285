"""A thin wrapper over the runc command line, run through the shim's reaper."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from podshim import errdefs
from podshim.system import reaper


class RuncError(errdefs.ShimError):
    """runc failed; the message is runc's own (spec §1.6: the last error of log.json)."""


@dataclass
class Runc:
    binary: str
    root: str
    log: str
    systemd_cgroup: bool = False

    def _argv(self, *args: str) -> list[str]:
        argv = [self.binary, "--root", self.root, "--log", self.log, "--log-format", "json"]
        if self.systemd_cgroup:
            argv.append("--systemd-cgroup")
        argv.extend(args)
        return argv

    def _last_error(self) -> str:
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
            if entry.get("level") == "error":
                return str(entry.get("msg", ""))
        return ""

    def _error(self, verb: str, status: int, stderr: str) -> RuncError:
        msg = self._last_error() or stderr or f"exit status {status}"
        if verb in ("create", "exec", "start", "run"):
            # The wording containerd users know from runc-v2.
            return RuncError(f"OCI runtime {verb} failed: {msg}")
        return RuncError(f"runc {verb} failed: {msg}")

    async def _run(self, *args: str, input: bytes | None = None, pass_fds: Sequence[int] = ()) -> bytes:
        res = await reaper.run(self._argv(*args), input=input, pass_fds=pass_fds)
        if res.returncode != 0:
            raise self._error(args[0], res.returncode, res.stderr.decode(errors="replace").strip())
        return res.stdout

    async def create(
        self,
        cid: str,
        bundle: str,
        pid_file: str,
        *,
        console_socket: str | None = None,
        no_pivot: bool = False,
        no_new_keyring: bool = False,
        stdio_fds: tuple[int, int, int] | None = None,
    ) -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        if no_new_keyring:
            args.append("--no-new-keyring")
        await self._run_with_stdio([*args, cid], stdio_fds)

    async def exec(
        self,
        cid: str,
        process_json: str,
        pid_file: str,
        *,
        console_socket: str | None = None,
        stdio_fds: tuple[int, int, int] | None = None,
    ) -> None:
        args = ["exec", "--process", process_json, "--detach", "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self._run_with_stdio([*args, cid], stdio_fds)

    async def _run_with_stdio(self, args: list[str], stdio_fds: tuple[int, int, int] | None) -> None:
        """runc hands its own stdio to the container process, so it gets the container's pipes, or
        /dev/null: pipes of ours would be held open by the container and never reach EOF."""
        if stdio_fds is None:
            proc, exited = await reaper.spawn_off_loop(self._argv(*args))
        else:
            proc, exited = await reaper.spawn_off_loop(
                self._argv(*args), stdin=stdio_fds[0], stdout=stdio_fds[1], stderr=stdio_fds[2]
            )
        ex = await reaper.wait_or_kill(proc.pid, exited)
        if ex.status != 0:
            raise self._error(args[0], ex.status, "")

    async def start(self, cid: str) -> None:
        await self._run("start", cid)

    async def kill(self, cid: str, signal: int, all: bool = False) -> None:
        args = ["kill"] + (["--all"] if all else []) + [cid, str(signal)]
        await self._run(*args)

    async def delete(self, cid: str, force: bool = False) -> None:
        await self._run(*(["delete"] + (["--force"] if force else []) + [cid]))

    async def pause(self, cid: str) -> None:
        await self._run("pause", cid)

    async def resume(self, cid: str) -> None:
        await self._run("resume", cid)

    async def update(self, cid: str, resources_json: bytes) -> None:
        await self._run("update", "--resources", "-", cid, input=resources_json)

    async def ps(self, cid: str) -> list[int]:
        out = await self._run("ps", "--format", "json", cid)
        pids = json.loads(out or b"[]")
        return [int(p) for p in pids or []]

    async def state(self, cid: str) -> dict[str, object]:
        out = await self._run("state", cid)
        data = json.loads(out)
        assert isinstance(data, dict)
        return data


def read_pid_file(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def default_root(namespace: str, override: str = "") -> str:
    # spec §7.17: independent of containerd's state dir, overridable by Options.root.
    return os.path.join(override or "/run/containerd/runc", namespace)
