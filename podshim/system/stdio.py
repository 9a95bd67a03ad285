"""The shim's side of a process's stdio (spec §5.1, §5.2).

The scheme comes from stdout's URL: a FIFO path (what ctr and CRI use), ``binary://`` (a
logging driver), or ``file://``.  Output is pumped from pipes the container writes into the
client's FIFOs; the shim keeps its own handles on every FIFO so a client can detach and
re-attach without the container seeing EOF or EPIPE.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import os
import shutil
import signal
import socket
import struct
import termios
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from podshim import errdefs
from podshim.system import pump, reaper
from podshim.system.fds import close_fds

LOGGER_KILL_AFTER = 12.0
# Delete waits for output copies while they make progress, as long as they do (up to a limit):
# a fixed 2 s, as runc-v2 has, truncates large outputs when the machine is busy.
DRAIN_IDLE = 2.0
DRAIN_LIMIT = 30.0


@dataclass(frozen=True)
class StdioConfig:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False

    @property
    def null(self) -> bool:
        return not (self.stdin or self.stdout or self.stderr)


async def readable(fd: int) -> None:
    """Wait until fd is readable (or at EOF/hang-up)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: None if fut.done() else fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def writable(fd: int) -> None:
    """Wait until fd takes a write."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_writer(fd, lambda: None if fut.done() else fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_writer(fd)


async def drive(steps: pump.Steps, credit: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run a copy of :mod:`podshim.system.pump` on the event loop: its fds non-blocking, a wait
    for one of them or for stream credit awaited here."""
    for wait in steps:
        if wait.kind == pump.READ:
            await readable(wait.fd)
        elif wait.kind == pump.WRITE:
            await writable(wait.fd)
        else:
            assert credit is not None
            await credit()


async def copy(src: int, dst: int, progress: Callable[[], None] | None = None) -> None:
    """Copy src to dst until EOF (or EIO: a pty whose last slave closed)."""
    os.set_blocking(src, False)
    os.set_blocking(dst, False)
    await drive(pump.copy(src, dst, progress))


_dir_counter = itertools.count()


def _private_dir(prefix: str) -> str:
    """A fresh 0700 directory in /tmp (short: it holds a unix socket).  Not tempfile, whose
    imports cost every shim over 1 MiB."""
    while True:
        path = os.path.join("/tmp", f"{prefix}-{os.getpid()}-{next(_dir_counter)}")
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


async def receive_fds(conn: socket.socket, maxfds: int = 1) -> list[int]:
    """The fds of the next message on a connected unix socket, without blocking the loop: a
    runc that connects and then stalls (or dies) must not stop the shim."""
    conn.setblocking(False)
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(conn, 4096, maxfds)
            return fds
        except BlockingIOError:
            await readable(conn.fileno())


def _open_fifo_pair(path: str) -> tuple[int, int]:
    """Our own reader and writer on a FIFO: opens never block and writes never fail with EPIPE."""
    r = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    w = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    return r, w


@dataclass
class ProcessIO:
    """Everything the shim holds for one process's stdio, and the copies between them."""

    config: StdioConfig
    child_stdio: tuple[int, int, int] | None = None
    _child_ends: list[int] = field(default_factory=list)
    _own: list[int] = field(default_factory=list)
    _stdin_keep: int | None = None
    _stdin_fifo_r: int | None = None
    _stdin_pipe_w: int | None = None
    _stdout_dst: int | None = None
    _copies: list[asyncio.Task[None]] = field(default_factory=list)
    _outputs: list[asyncio.Task[None]] = field(default_factory=list)
    _last_progress: float = 0.0
    _logger_pid: int = 0
    _logger_exit: asyncio.Future[reaper.Exit] | None = None
    console_dir: str | None = None
    console_master: int | None = None
    _closed: bool = False

    @property
    def console_socket_path(self) -> str | None:
        return os.path.join(self.console_dir, "pty.sock") if self.console_dir else None

    # -- setup ---------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, config: StdioConfig, *, container_id: str, namespace: str, io_uid: int = 0, io_gid: int = 0
    ) -> ProcessIO:
        pio = cls(config)
        try:
            await pio._open(container_id, namespace, io_uid, io_gid)
        except BaseException:
            await pio.close()
            raise
        return pio

    async def _open(self, cid: str, ns: str, uid: int, gid: int) -> None:
        cfg = self.config
        if cfg.terminal:
            self.console_dir = _private_dir("podshim-pty")
            if cfg.stdin:
                self._stdin_fifo_r, self._stdin_keep = _open_fifo_pair(cfg.stdin)
            self._stdout_dst = await self._terminal_output(cid, ns)
            return
        if cfg.null:
            return
        url = urllib.parse.urlsplit(cfg.stdout)
        scheme = url.scheme or "fifo"
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self._own.append(devnull)
        stdin_fd = devnull
        if cfg.stdin:
            r, w = self._pipe(uid, gid)
            self._child_ends.append(r)
            self._stdin_pipe_w = w
            self._stdin_fifo_r, self._stdin_keep = _open_fifo_pair(cfg.stdin)
            stdin_fd = r
        if scheme == "fifo":
            out = self._fifo_output(cfg.stdout, uid, gid) if cfg.stdout else devnull
            if cfg.stderr and cfg.stderr == cfg.stdout:
                err = out
            else:
                err = self._fifo_output(cfg.stderr, uid, gid) if cfg.stderr else devnull
        elif scheme == "file":
            path = urllib.parse.unquote(url.path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            out = err = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            self._child_ends.append(out)
        elif scheme == "binary":
            out, err = await self._start_logger(url, cid, ns, uid, gid)
        else:
            raise errdefs.InvalidArgument(f"unknown STDIO scheme {scheme}")
        self.child_stdio = (stdin_fd, out, err)

    def _pipe(self, uid: int, gid: int) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        if uid or gid:
            os.fchown(r, uid, gid)
            os.fchown(w, uid, gid)
        return r, w

    def _fifo_output(self, path: str, uid: int, gid: int) -> int:
        r, w = self._pipe(uid, gid)
        fifo_r, fifo_w = _open_fifo_pair(path)
        self._own.append(fifo_r)
        self._child_ends.append(w)
        self._spawn_copy(r, fifo_w)
        return w

    def _spawn_copy(self, src: int, dst: int, output: bool = True) -> None:
        async def run() -> None:
            try:
                await copy(src, dst, self._progressed if output else None)
            finally:
                close_fds(src, dst)

        task = asyncio.get_running_loop().create_task(run())
        self._copies.append(task)
        if output:
            self._outputs.append(task)

    async def _start_logger(
        self, url: urllib.parse.SplitResult, cid: str, ns: str, uid: int, gid: int
    ) -> tuple[int, int]:
        out_r, out_w = self._pipe(uid, gid)
        err_r, err_w = self._pipe(uid, gid)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        args = [urllib.parse.unquote(url.path)]
        for k, v in urllib.parse.parse_qsl(url.query, keep_blank_values=True):
            args += [k, v]
        try:
            # The logger sees fd 3, 4, 5 = stdout, stderr, ready; its env is only these two.
            self._logger_pid, self._logger_exit = reaper.spawn_with_fds(
                args, {3: out_r, 4: err_r, 5: ready_w}, env={"CONTAINER_ID": cid, "CONTAINER_NAMESPACE": ns}
            )
        except OSError as e:
            close_fds(out_r, out_w, err_r, err_w, ready_r, ready_w)
            raise errdefs.ShimError(f"failed to start logging binary {args[0]}: {e}") from e
        close_fds(out_r, err_r, ready_w)
        self._child_ends += [out_w, err_w]
        try:
            # Ready when the logger writes to or closes fd 5.
            await asyncio.wait_for(self._wait_ready(ready_r), timeout=10)
        finally:
            close_fds(ready_r)
        return out_w, err_w

    async def _wait_ready(self, fd: int) -> None:
        os.set_blocking(fd, False)
        while True:
            try:
                os.read(fd, 1)
                return
            except BlockingIOError:
                await readable(fd)

    async def _terminal_output(self, cid: str, ns: str) -> int | None:
        cfg = self.config
        if not cfg.stdout:
            return None
        url = urllib.parse.urlsplit(cfg.stdout)
        scheme = url.scheme or "fifo"
        if scheme == "fifo":
            r, w = _open_fifo_pair(cfg.stdout)
            self._own.append(r)
            return w
        if scheme == "file":
            path = urllib.parse.unquote(url.path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        if scheme == "binary":
            out_w, err_w = await self._start_logger(url, cid, ns, 0, 0)
            self._child_ends.remove(out_w)
            # In terminal mode the logger's stderr is a pipe nobody writes (spec §5.1).
            self._own.append(err_w)
            self._child_ends.remove(err_w)
            return out_w
        raise errdefs.InvalidArgument(f"unknown STDIO scheme {scheme}")

    # -- after runc create/exec --------------------------------------------------------------

    def listen_console(self) -> asyncio.Task[int]:
        """Accept runc's connection on the console socket and receive the pty master."""
        assert self.console_socket_path is not None
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(self.console_socket_path)
        srv.listen(1)
        srv.setblocking(False)

        async def accept() -> int:
            loop = asyncio.get_running_loop()
            try:
                conn, _ = await loop.sock_accept(srv)
            finally:
                srv.close()
            with conn:
                fds = await receive_fds(conn)
            if not fds:
                raise errdefs.ShimError("runc sent no console master")
            for extra in fds[1:]:
                close_fds(extra)
            return fds[0]

        return asyncio.get_running_loop().create_task(accept())

    def attach_console(self, master: int) -> None:
        self.console_master = master
        os.set_inheritable(master, False)
        if self._stdin_fifo_r is not None:
            self._spawn_copy(self._stdin_fifo_r, os.dup(master), output=False)
            self._stdin_fifo_r = None
        if self._stdout_dst is not None:
            self._spawn_copy(os.dup(master), self._stdout_dst)
            self._stdout_dst = None

    def started(self) -> None:
        """The process holds its ends now; the shim's copies would keep EOF from ever coming."""
        close_fds(*self._child_ends)
        self._child_ends.clear()
        if self._stdin_fifo_r is not None and self._stdin_pipe_w is not None:
            self._spawn_copy(self._stdin_fifo_r, self._stdin_pipe_w, output=False)
            self._stdin_fifo_r = self._stdin_pipe_w = None

    # -- operations -----------------------------------------------------------------------

    def resize(self, width: int, height: int) -> None:
        if self.console_master is None:
            return
        fcntl.ioctl(self.console_master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def close_stdin(self) -> None:
        """CloseIO: drop our writer on the stdin FIFO, so EOF comes once the client's closes too."""
        close_fds(self._stdin_keep)
        self._stdin_keep = None

    def _progressed(self) -> None:
        self._last_progress = asyncio.get_running_loop().time()

    async def drain(self, idle: float = DRAIN_IDLE, limit: float = DRAIN_LIMIT) -> None:
        """Wait for output copies to finish after the process exited: until they stall for
        ``idle`` seconds (a writer that never closes, such as a daemonised grandchild holding
        stdout) or ``limit`` passes."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while outputs := [t for t in self._outputs if not t.done()]:
            await asyncio.wait(outputs, timeout=0.1)
            now = loop.time()
            if now - max(self._last_progress, start) > idle or now - start > limit:
                return

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for t in self._copies:
            t.cancel()
        if self._copies:
            await asyncio.gather(*self._copies, return_exceptions=True)
        close_fds(*self._child_ends, *self._own, self._stdin_keep, self._stdin_fifo_r, self._stdin_pipe_w)
        close_fds(self._stdout_dst, self.console_master)
        self._child_ends.clear()
        self._own.clear()
        self._stdin_keep = self._stdin_fifo_r = self._stdin_pipe_w = self._stdout_dst = None
        self.console_master = None
        if self.console_dir:
            shutil.rmtree(self.console_dir, ignore_errors=True)
        await self._stop_logger()

    async def _stop_logger(self) -> None:
        if not self._logger_pid or self._logger_exit is None:
            return
        if not self._logger_exit.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._logger_pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self._logger_exit), LOGGER_KILL_AFTER)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._logger_pid, signal.SIGKILL)
                await self._logger_exit
        self._logger_pid = 0
