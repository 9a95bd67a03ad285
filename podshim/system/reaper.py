"""The shim's one child reaper (spec §5.4).

The shim is a child subreaper: container inits and detached execs are reparented to it.  A
single SIGCHLD handler reaps every child with ``wait4(-1, WNOHANG)`` and routes each status to
whoever claimed that pid.  Nothing else in the shim may call ``waitpid``: ``Popen.wait()``
beside a ``waitpid(-1)`` loop loses exit codes, so child programs (runc, loggers, qemu) are
spawned here and their exit is awaited through this reaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from podshim.system import children
from podshim.system.children import Exit as Exit
from podshim.system.children import ExitCallback as ExitCallback
from podshim.system.children import PidfdOpenFn, WaitFn
from podshim.system.children import exit_code as exit_code

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


class Reaper(children.Reaper):
    """The shared reaper, run by the event loop's SIGCHLD handler."""

    def __init__(self, wait4: WaitFn = os.wait4, pidfd_open: PidfdOpenFn = os.pidfd_open) -> None:
        super().__init__(wait4, pidfd_open)
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_signal_handler(signal.SIGCHLD, self.reap)

    def uninstall(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None

    def claim_future(self, pid: int) -> asyncio.Future[Exit]:
        fut: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()

        def done(ex: Exit) -> None:
            if not fut.done():
                fut.set_result(ex)

        self.claim(pid, done)
        return fut


REAPER = Reaper()


@dataclass
class Completed:
    argv: Sequence[str]
    returncode: int
    stdout: bytes
    stderr: bytes


async def _read_all(fd: int) -> bytes:
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if data:
            chunks.append(data)
            return
        loop.remove_reader(fd)
        if not done.done():
            done.set_result(None)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return b"".join(chunks)


def _popen(
    argv: Sequence[str],
    *,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = subprocess.DEVNULL,
    stderr: int | None = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    pass_fds: Sequence[int] = (),
    start_new_session: bool = False,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        list(argv),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=env,
        cwd=cwd,
        pass_fds=tuple(pass_fds),
        start_new_session=start_new_session,
        preexec_fn=preexec_fn,
    )


Spawned = tuple[subprocess.Popen[bytes], asyncio.Future[Exit]]


def spawn(argv: Sequence[str], **options: Any) -> Spawned:
    """Start a child whose exit is delivered by the reaper, never by Popen.wait().  The options
    are Popen's stdio, env, cwd, pass_fds, start_new_session and preexec_fn."""
    proc = _popen(argv, **options)
    # Claimed in the same loop iteration as the fork, so the reaper cannot have seen it yet.
    return proc, _claim_popen(proc)


async def spawn_off_loop(argv: Sequence[str], **options: Any) -> Spawned:
    """``spawn``, with the fork and exec on a worker thread.  Popen returns only once the child
    has exec'd, and on a loaded node the child may wait for a CPU first: every runc call would
    stop the shim's loop for that long.  Exits reaped meanwhile are kept (``expecting``), and a
    child whose caller was cancelled during the spawn is killed, not left running."""
    loop = asyncio.get_running_loop()
    popen = functools.partial(_popen, argv, **options)
    with REAPER.expecting():
        spawning = loop.run_in_executor(None, popen)
        try:
            proc = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            proc = await spawning  # the child exists, or will in a moment: it must not outlive us
            fut = _claim_popen(proc)
            await kill_and_reap(proc.pid, fut)
            raise
        return proc, _claim_popen(proc)


def _claim_popen(proc: subprocess.Popen[bytes]) -> asyncio.Future[Exit]:
    fut = REAPER.claim_future(proc.pid)

    def settle(f: asyncio.Future[Exit]) -> None:
        # Popen must never poll this pid again: it may be reused by a container process.
        proc.returncode = f.result().status if not f.cancelled() else -1

    fut.add_done_callback(settle)
    return fut


async def wait_or_kill(pid: int, exited: asyncio.Future[Exit]) -> Exit:
    """The child's exit.  If the waiting is cancelled (a deadline), the child is SIGKILLed
    first, as Go's ``exec.CommandContext`` does, and reaped before the cancellation goes on."""
    try:
        return await asyncio.shield(exited)
    except BaseException:
        await kill_and_reap(pid, exited)
        raise


async def kill_and_reap(pid: int, exited: asyncio.Future[Exit], timeout: float = 5.0) -> None:
    if not exited.done():
        # The pid cannot have been reused: it is ours to reap, and its exit has not been seen.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(exited), timeout)


def spawn_with_fds(
    argv: Sequence[str], fds: Mapping[int, int], env: Mapping[str, str] | None = None
) -> tuple[int, asyncio.Future[Exit]]:
    """:func:`children.spawn_with_fds`, its exit claimed in the same loop iteration."""
    pid = children.spawn_with_fds(argv, fds, env)
    return pid, REAPER.claim_future(pid)


async def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    pass_fds: Sequence[int] = (),
) -> Completed:
    """Run a helper program to completion, collecting its output."""
    proc, exited = await spawn_off_loop(
        argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        pass_fds=pass_fds,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = os.dup(proc.stdout.fileno()), os.dup(proc.stderr.fileno())
    proc.stdout.close()
    proc.stderr.close()
    if input is not None:
        assert proc.stdin is not None
        # Inputs are small JSON documents, well under a pipe buffer: a plain write cannot block.
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(input)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    try:
        out, err = await asyncio.gather(_read_all(out_fd), _read_all(err_fd))
    except BaseException:
        await kill_and_reap(proc.pid, exited)
        raise
    ex = await wait_or_kill(proc.pid, exited)
    return Completed(argv, ex.status, out, err)
