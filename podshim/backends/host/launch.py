"""Starting a host process the way runc starts a container: created first, run later.

At Create the shim ``posix_spawn``s the gate (``gate.py``, a separate stdlib program) with its
own session, default signal dispositions, an empty signal mask and only the descriptors it
needs, and moves it into the container's cgroup; the gate applies identity and limits, then
blocks on a pipe.  Start releases it to exec the workload in its own place.  So a host-process
task has its real pid from Create on, like a runc task, a failed exec (a missing binary) is
reported by Start, and nothing of the shim (its signal handlers, its asyncio wakeup fd, its
descriptors) is ever shared with the workload: a signal sent to a created process is that
process's own business.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import marshal
import os
import resource
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from podshim import errdefs
from podshim.backends.host import gate
from podshim.system import cgroups
from podshim.system.reaper import REAPER, Exit

_RLIMITS = {name: getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_")}

# Read once, with the backend: a shim that outlives a package upgrade keeps its own gate.
with open(gate.__file__, encoding="utf-8") as _f:
    GATE_SOURCE = _f.read()


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
        """Let the gate exec the workload; raise with its message if that fails."""
        with contextlib.suppress(BrokenPipeError):  # the gate failed already: its message says why
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


def _gate_spec(spec: LaunchSpec) -> bytes:
    return marshal.dumps(
        {
            "args": spec.args,
            "env": spec.env,
            "cwd": spec.cwd,
            "uid": spec.uid,
            "gid": spec.gid,
            "groups": spec.additional_gids,
            "rlimits": spec.rlimits,
            "tty": spec.tty_slave is not None,
        }
    )


def _high(fd: int) -> int:
    """A close-on-exec copy above the gate's fixed descriptors, so no file action clobbers a
    source that a later one still needs."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 16)


def spawn_held(spec: LaunchSpec) -> Held:
    """Spawn the gate for ``spec``, in its cgroup, waiting for release()."""
    memfd = os.memfd_create("podshim-launch", os.MFD_CLOEXEC)
    hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    sources: list[int] = []
    try:
        os.write(memfd, _gate_spec(spec))
        os.lseek(memfd, 0, os.SEEK_SET)
        if spec.tty_slave is not None:
            stdio = (spec.tty_slave,) * 3
        elif spec.stdio is not None:
            stdio = spec.stdio
        else:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            sources.append(null)
            stdio = (null,) * 3
        fixed = [_high(fd) for fd in (*stdio, memfd, hold_r, err_w)]  # the gate's 0..5
        sources += fixed
        actions = [(os.POSIX_SPAWN_DUP2, src, target) for target, src in enumerate(fixed)]
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-I", "-S", "-c", GATE_SOURCE],
            {},
            file_actions=actions,
            setsid=True,
            setsigdef=signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP},
            setsigmask=(),
        )
    except BaseException:
        for fd in (hold_w, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (memfd, hold_r, err_w, *sources):
            os.close(fd)
    # Claimed before any await: the reaper cannot have seen this child yet.
    held = Held(pid, REAPER.claim_future(pid), hold_w, err_r)
    if spec.cgroup is not None:
        try:
            cgroups.join(spec.cgroup, pid)
        except OSError:
            held.abandon()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            raise
    return held
