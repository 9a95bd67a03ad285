"""runc's command line (:mod:`podshim.system.runc_command`), run through the shim's reaper."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from podshim import errdefs
from podshim.system import reaper
from podshim.system import runc_command as cmd
from podshim.system.runc_command import read_pid_file as read_pid_file


class RuncError(errdefs.ShimError):
    """runc failed; the message is runc's own (spec §1.6: the last error of log.json)."""


@dataclass
class Runc:
    binary: str
    root: str
    log: str
    systemd_cgroup: bool = False

    @property
    def command(self) -> cmd.RuncCommand:
        return cmd.RuncCommand(self.binary, self.root, self.log, self.systemd_cgroup)

    def _error(self, verb: str, status: int, stderr: str) -> RuncError:
        return RuncError(self.command.error_message(verb, status, stderr))

    async def _run(self, *args: str, input: bytes | None = None, pass_fds: Sequence[int] = ()) -> bytes:
        res = await reaper.run(self.command.argv(*args), input=input, pass_fds=pass_fds)
        if res.returncode != 0:
            raise self._error(args[0], res.returncode, res.stderr.decode(errors="replace").strip())
        return res.stdout

    async def run_with_stdio(self, args: list[str], stdio_fds: tuple[int, int, int] | None) -> None:
        """``create`` or ``exec`` (:func:`~podshim.system.runc_command.create_args`, ``exec_args``).

        runc hands its own stdio to the container process, so it gets the container's pipes, or
        /dev/null: pipes of ours would be held open by the container and never reach EOF."""
        argv = self.command.argv(*args)
        if stdio_fds is None:
            proc, exited = await reaper.spawn_off_loop(argv)
        else:
            proc, exited = await reaper.spawn_off_loop(
                argv, stdin=stdio_fds[0], stdout=stdio_fds[1], stderr=stdio_fds[2]
            )
        ex = await reaper.wait_or_kill(proc.pid, exited)
        if ex.status != 0:
            raise self._error(args[0], ex.status, "")

    async def start(self, cid: str) -> None:
        await self._run("start", cid)

    async def kill(self, cid: str, signal: int, all: bool = False) -> None:
        await self._run(*cmd.kill_args(cid, signal, all))

    async def delete(self, cid: str, force: bool = False) -> None:
        await self._run(*cmd.delete_args(cid, force))

    async def pause(self, cid: str) -> None:
        await self._run("pause", cid)

    async def resume(self, cid: str) -> None:
        await self._run("resume", cid)

    async def update(self, cid: str, resources_json: bytes) -> None:
        await self._run(*cmd.update_args(cid, "-"), input=resources_json)

    async def ps(self, cid: str) -> list[int]:
        return cmd.parse_ps(await self._run(*cmd.ps_args(cid)))

    async def state(self, cid: str) -> dict[str, object]:
        out = await self._run("state", cid)
        data = json.loads(out)
        assert isinstance(data, dict)
        return data


def default_root(namespace: str, override: str = "") -> str:
    # spec §7.17: independent of containerd's state dir, overridable by Options.root.
    return os.path.join(override or "/run/containerd/runc", namespace)
