"""Starting a host process the way runc starts a container: created first, run later.

The child is forked at Create, sets itself up (session, cgroup, identity, limits, stdio), then
blocks on a pipe; Start releases it to exec.  So a host-process task has its real pid from
Create on, like a runc task, and a failed exec (a missing binary) is reported by Start.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import resource
import termios
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from podshim import errdefs
from podshim.system import cgroups
from podshim.system.reaper import REAPER, Exit

_RLIMITS = {name: getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_")}


@dataclass
class LaunchSpec:
    args: list[str]
    env: dict[str, str]
    cwd: str
    uid: int | None = None  # None: keep the shim's identity
    gid: int | None = None
    additional_gids: list[int] = field(default_factory=list)
    rlimits: list[tuple[int, int, int]] = field(default_factory=list)  # (resource, soft, hard)
    cgroup: cgroups.Cgroup | None = None
    stdio: tuple[int, int, int] | None = None
    tty_slave: int | None = None


def rlimits_of(process: Mapping[str, object]) -> list[tuple[int, int, int]]:
    out = []
    for rl in process.get("rlimits") or []:  # type: ignore[attr-defined]
        res = _RLIMITS.get(str(rl.get("type", "")))
        if res is None:
            raise errdefs.InvalidArgument(f"unknown rlimit {rl.get('type')!r}")
        out.append((res, int(rl.get("soft", 0)), int(rl.get("hard", 0))))
    return out


def env_of(entries: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in entries:
        key, _, value = entry.partition("=")
        env[key] = value
    return env


@dataclass
class Held:
    pid: int
    exited: asyncio.Future[Exit]
    _release: int
    _errors: int

    async def release(self) -> None:
        """Let the child exec; raise with its message if the exec fails."""
        os.write(self._release, b"x")
        os.close(self._release)
        loop = asyncio.get_running_loop()
        os.set_blocking(self._errors, False)
        chunks: list[bytes] = []
        done: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            try:
                data = os.read(self._errors, 4096)
            except BlockingIOError:
                return
            if data:
                chunks.append(data)
            elif not done.done():
                done.set_result(None)

        loop.add_reader(self._errors, readable)
        try:
            await done
        finally:
            loop.remove_reader(self._errors)
            os.close(self._errors)
        if chunks:
            raise errdefs.ShimError(b"".join(chunks).decode(errors="replace"))

    def abandon(self) -> None:
        for fd in (self._release, self._errors):
            with contextlib.suppress(OSError):
                os.close(fd)


def spawn_held(spec: LaunchSpec) -> Held:
    """Fork the child and leave it waiting for release().  The caller runs no other threads."""
    hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; only exec or _exit leave this branch
        try:
            _child(spec, hold_r, err_w)
        except BaseException as e:
            msg = f"{e}" if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
            try:
                os.write(err_w, f"exec {spec.args[0] if spec.args else '?'}: {msg}".encode())
            finally:
                os._exit(127)
    os.close(hold_r)
    os.close(err_w)
    # Claimed before any await: the reaper cannot have seen this child yet.
    return Held(pid, REAPER.claim_future(pid), hold_w, err_r)


def _child(spec: LaunchSpec, hold_r: int, err_w: int) -> None:
    os.setsid()
    if spec.cgroup is not None:
        cgroups.join(spec.cgroup)
    if spec.tty_slave is not None:
        for fd in (0, 1, 2):
            os.dup2(spec.tty_slave, fd)
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    elif spec.stdio is not None:
        for i, fd in enumerate(spec.stdio):
            os.dup2(fd, i)
    else:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
    for res, soft, hard in spec.rlimits:
        resource.setrlimit(res, (soft, hard))
    if spec.gid is not None:
        os.setgroups(spec.additional_gids)
        os.setgid(spec.gid)
    if spec.uid is not None:
        os.setuid(spec.uid)
    os.chdir(spec.cwd)
    # Wait for Start.  EOF without a byte means the shim dropped the process: do not run it.
    if os.read(hold_r, 1) != b"x":
        os._exit(0)
    os.execvpe(spec.args[0], spec.args, spec.env)
