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
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def exit_code(wait_status: int) -> int:
    """Exit code as containerd reports it: a death by signal N is 128 + N."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)


@dataclass(frozen=True)
class Exit:
    pid: int
    status: int
    at: float  # time.time() when reaped: what containerd stores as exited_at


ExitCallback = Callable[[Exit], None]


WaitFn = Callable[[int, int], tuple[int, int, object]]
PidfdOpenFn = Callable[[int], int]


def _names_a_process(pidfd_open: PidfdOpenFn, pid: int) -> bool:
    """Whether ``pid`` names a process right now (running, or a zombie nobody reaped yet).

    A pidfd refers to the process the pid names at the moment it is opened, so unlike
    ``kill(pid, 0)`` this cannot be fooled into a yes by something that is not a process."""
    try:
        fd = pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EINVAL (not a thread-group leader) and the like: something lives there
    os.close(fd)
    return True


class Reaper:
    def __init__(self, wait4: WaitFn = os.wait4, pidfd_open: PidfdOpenFn = os.pidfd_open) -> None:
        self._wait4 = wait4
        self._pidfd_open = pidfd_open
        self._claims: dict[int, ExitCallback] = {}
        # Exits of pids nobody has claimed yet, kept only while a claim may still come
        # (a container that exits before its pid file is read).
        self._unclaimed: dict[int, Exit] = {}
        self._expecting = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.observers: list[ExitCallback] = []

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_signal_handler(signal.SIGCHLD, self.reap)

    def uninstall(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Keep unclaimed exits while the caller learns a pid (runc create/exec, pid files)."""
        self._expecting += 1
        try:
            yield
        finally:
            self._expecting -= 1
            if self._expecting == 0:
                self._unclaimed.clear()

    def claim(self, pid: int, callback: ExitCallback) -> None:
        """Route pid's exit to callback, also one reaped earlier while ``expecting``.

        An exit kept for pid may be a former holder's: a process of ours that exited, was
        reaped, and whose pid the kernel then gave to the process being claimed now.  A pid is
        only reused once its zombie is reaped, so while pid still names a process, that
        process is the one being claimed and the kept exit is stale."""
        early = self._unclaimed.pop(pid, None)
        if early is not None and not _names_a_process(self._pidfd_open, pid):
            callback(early)
            return
        self._claims[pid] = callback

    def unclaim(self, pid: int) -> None:
        self._claims.pop(pid, None)

    def claim_future(self, pid: int) -> asyncio.Future[Exit]:
        fut: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()

        def done(ex: Exit) -> None:
            if not fut.done():
                fut.set_result(ex)

        self.claim(pid, done)
        return fut

    def reap(self) -> None:
        while True:
            try:
                pid, status, _ = self._wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            ex = Exit(pid, exit_code(status), time.time())
            cb = self._claims.pop(pid, None)
            if cb is not None:
                cb(ex)
            elif self._expecting:
                self._unclaimed[pid] = ex
            for obs in self.observers:
                obs(ex)


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
    """Start a child with exactly the descriptors in ``fds`` (child fd -> our fd), plus /dev/null
    for any of 0-2 not given.  Everything of ours is close-on-exec, so nothing else leaks."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, fds.get(i, devnull), i) for i in (0, 1, 2)]
        actions += [(os.POSIX_SPAWN_DUP2, ours, theirs) for theirs, ours in fds.items() if theirs > 2]
        pid = os.posix_spawn(argv[0], list(argv), dict(env or {}), file_actions=actions)
    finally:
        os.close(devnull)
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
