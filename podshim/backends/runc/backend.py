"""Process isolation: containers run by runc on this host (spec §3, §5)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from podshim import oci
from podshim.backends.base import Backend, Container, ContainerRequest, PipedProcess, Process, ProcessGone
from podshim.backends.runc.runc import Runc, RuncError
from podshim.system import cgroups, mounts, runc_command
from podshim.system.blocking import off_loop
from podshim.system.cgroups import Cgroup, OOMWatcher
from podshim.system.reaper import REAPER, Exit, kill_and_reap
from podshim.system.runc_command import read_pid_file
from podshim.system.stdio import ProcessIO, StdioConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuncSettings:
    binary: str = "runc"
    root: str = "/run/containerd/runc"
    systemd_cgroup: bool = False
    no_pivot_root: bool = False
    no_new_keyring: bool = False
    io_uid: int = 0
    io_gid: int = 0


def exec_pid_file(bundle: str, exec_id: str) -> str:
    """Exec pid files have a name space of their own: no exec id can name ``init.pid``."""
    return os.path.join(bundle, f"exec-{exec_id}.pid")


_TICKS = os.sysconf("SC_CLK_TCK")
# A failed exec's strays: scanned until this many passes in a row find none (or at most
# STRAY_SCANS passes), STRAY_SCAN_PAUSE apart.
STRAY_SCANS = 25
STRAY_QUIET_SCANS = 3
STRAY_SCAN_PAUSE = 0.02


def boot_ticks() -> int:
    """Now, in the unit of /proc/<pid>/stat's start time (clock ticks since boot)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _TICKS)


def _stat(pid: int) -> tuple[int, int, str]:
    """(parent pid, start time in ticks since boot, state); (0, 0, "") once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[19]), fields[0]
    except (OSError, ValueError, IndexError):
        return 0, 0, ""


def _descends_from(pid: int, ancestors: set[int]) -> bool:
    me = os.getpid()
    while pid > 1 and pid != me:
        if pid in ancestors:
            return True
        pid = _stat(pid)[0]
    return False


def _remove(pid_file: str) -> None:
    """A pid file, and runc's temporary one beside it (a killed runc leaves that behind, and
    the next runc with the same pid file refuses to start: "file exists")."""
    d, name = os.path.split(pid_file)
    for path in (pid_file, os.path.join(d, "." + name)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _prepare_exec_files(pid_file: str, spec_path: str, spec: dict[str, Any]) -> None:
    _remove(pid_file)
    fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)


async def _kill_half_started(pid_file: str, on_exit: Callable[[Exit], None] = lambda ex: None) -> int:
    """After ``runc create`` or ``runc exec`` failed or was killed (a deadline): the process it
    wrote a pid file for may be running, ours now to kill and reap.  Called while the reaper
    keeps unclaimed exits, so an exit that came first is not lost.  Returns the pid, or 0."""
    try:
        pid = read_pid_file(pid_file)
    except (OSError, ValueError):
        return 0
    exited: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()

    def claimed(ex: Exit) -> None:
        on_exit(ex)
        if not exited.done():
            exited.set_result(ex)

    REAPER.claim(pid, claimed)
    await kill_and_reap(pid, exited)
    return pid


class _RuncProcess(PipedProcess):
    """What init and execs share: their pid claimed from the reaper."""

    def _claim(self, pid: int) -> None:
        self.pid = pid
        REAPER.claim(pid, self.exited)

    async def close(self) -> None:
        if self.pid and self._exit is None:
            REAPER.unclaim(self.pid)
        if self.pio is not None:
            await self.pio.close()


class RuncInit(_RuncProcess):
    def __init__(self, container: RuncContainer, pio: ProcessIO, pid: int) -> None:
        super().__init__(pio)
        self.container = container
        self._claim(pid)

    async def start(self) -> int:
        await self.container.runc.start(self.container.id)
        self.container.started(self.pid)
        return self.pid

    async def kill(self, signal: int) -> None:
        # kill(2), not `runc kill`: that is all runc does for one process, and the pid cannot have
        # been reused, since we are the one who reaps it and its exit has not been seen.  Spawning
        # runc made Kill slow enough, on a busy node, for CRI's StopPodSandbox to find the shim
        # already shut down by the exit handler it raced with ("ttrpc: closed").
        if self._exit is not None:
            raise ProcessGone()
        try:
            os.kill(self.pid, signal)
        except ProcessLookupError as e:
            raise ProcessGone() from e


class RuncExec(_RuncProcess):
    def __init__(
        self, container: RuncContainer, exec_id: str, spec: dict[str, Any], stdio: StdioConfig
    ) -> None:
        super().__init__(None)
        self.container = container
        self.exec_id = exec_id
        self.spec = spec
        self.stdio = stdio

    async def start(self) -> int:
        c = self.container
        s = c.backend.settings
        # The FIFOs are opened at Start, not at Exec, as runc-v2 does: ctr only arms its
        # CloseIO once Exec has returned, so a client that has all its stdin at once would
        # otherwise hit EOF first and never close our end.
        self.pio = await ProcessIO.open(
            self.stdio, container_id=c.id, namespace=c.req.namespace, io_uid=s.io_uid, io_gid=s.io_gid
        )
        if self._stdin_closed:
            self.pio.close_stdin()
        try:
            return await self._start()
        except BaseException:
            # The client waits for EOF on its FIFOs after a failed start: let it come.
            await self.pio.close()
            raise

    async def _start(self) -> int:
        c = self.container
        c.exec_starts += 1
        try:
            return await self._run_exec()
        finally:
            c.exec_starts -= 1

    async def _run_exec(self) -> int:
        c = self.container
        assert self.pio is not None
        pid_file = exec_pid_file(c.bundle, self.exec_id)
        # Exec ids are unique among live execs: the name cannot clash with another start.
        spec_path = os.path.join(c.bundle, f".exec-{self.exec_id}.json")
        # Only this start's pid file may name a process to kill.
        await off_loop(_prepare_exec_files, pid_file, spec_path, self.spec)
        try:
            console = self.pio.listen_console() if self.pio.console_socket_path else None
            since = boot_ticks()
            with REAPER.expecting():
                try:
                    console_path = self.pio.console_socket_path
                    args = runc_command.exec_args(c.id, spec_path, pid_file, console_socket=console_path)
                    await c.runc.run_with_stdio(args, self.pio.child_stdio)
                except BaseException:
                    if console is not None:
                        console.cancel()
                    self.pid = await _kill_half_started(pid_file, self.exited)
                    if not self.pid:
                        await c.kill_strays(since)
                    raise
                if console is not None:
                    self.pio.attach_console(await console)
                self.pio.started()
                self._claim(await off_loop(read_pid_file, pid_file))
        finally:
            await off_loop(_unlink_quietly, spec_path)
        return self.pid

    async def kill(self, signal: int) -> None:
        if self._exit is not None or not self.pid:
            raise ProcessGone()
        try:
            os.kill(self.pid, signal)
        except ProcessLookupError as e:
            raise ProcessGone() from e

    async def close(self) -> None:
        self.container.execs.discard(self)
        await super().close()
        await off_loop(_unlink_quietly, exec_pid_file(self.container.bundle, self.exec_id))


class RuncContainer(Container):
    def __init__(self, backend: RuncBackend, req: ContainerRequest, runc: Runc) -> None:
        self.backend = backend
        self.id = req.id
        self.bundle = req.bundle
        self.req = req
        self.runc = runc
        self.cgroup: Cgroup | None = None
        self.execs: set[RuncExec] = set()
        self.exec_starts = 0
        self._mounted = False
        self._deleted = False

    @property
    def rootfs(self) -> str:
        return os.path.join(self.bundle, "rootfs")

    @property
    def shares_pid_namespace(self) -> bool:
        return oci.joins_or_shares_pid_namespace(self.req.spec)

    async def create(self) -> None:
        s = self.backend.settings
        pio: ProcessIO | None = None
        try:
            if self.req.rootfs:
                self._mounted = True  # before the await: a cancelled Create unmounts what got mounted
                await off_loop(mounts.mount_all, self.req.rootfs, self.rootfs)
            pio = await ProcessIO.open(
                self.req.stdio,
                container_id=self.id,
                namespace=self.req.namespace,
                io_uid=s.io_uid,
                io_gid=s.io_gid,
            )
            console = pio.listen_console() if pio.console_socket_path else None
            pid_file = os.path.join(self.bundle, "init.pid")
            await off_loop(_remove, pid_file)
            with REAPER.expecting():
                try:
                    args = runc_command.create_args(
                        self.id,
                        self.bundle,
                        pid_file,
                        console_socket=pio.console_socket_path,
                        no_pivot=s.no_pivot_root,
                        no_new_keyring=s.no_new_keyring,
                    )
                    await self.runc.run_with_stdio(args, pio.child_stdio)
                except BaseException:
                    if console is not None:
                        console.cancel()
                    await _kill_half_started(pid_file)
                    raise
                if console is not None:
                    pio.attach_console(await console)
                pio.started()
                self.init = RuncInit(self, pio, await off_loop(read_pid_file, pid_file))
                # Stats work from Create on, as with runc-v2 (containerd's client tests ask early).
                self.cgroup = Cgroup.of_pid(self.init.pid)
        except BaseException:
            # Also when cancelled (a deadline): runc create is killed by then, and what it made
            # goes now, or the id stays taken and its cgroup, mounts and runc state leak.
            if pio is not None:
                await pio.close()
            with contextlib.suppress(Exception):
                await self.runc.delete(self.id, force=True)
            await self._unmount()
            raise

    def started(self, pid: int) -> None:
        if self.cgroup is None:
            self.cgroup = Cgroup.of_pid(pid)
        if self.cgroup is not None:
            self.backend.oom.add(self.id, self.cgroup)

    async def new_exec(self, exec_id: str, process_spec: dict[str, Any], stdio: StdioConfig) -> Process:
        e = RuncExec(self, exec_id, process_spec, stdio)
        self.execs.add(e)
        return e

    async def kill_strays(self, since: int) -> None:
        """After a ``runc exec`` killed (a deadline) before it wrote its pid file: the process it
        was starting may live on in the container, known to nobody.  It is a process of the
        cgroup that started after ``since`` (boot ticks) and descends neither from the init nor
        from a known exec.  Skipped while another exec start is in flight, whose process is not
        known yet either.

        Scanned until the cgroup stays quiet for a few passes: runc's orphaned ``runc init``
        forks the process it was starting, so a single pass can kill the parent while its child
        (not in the list just read) goes on to exec the workload."""
        if self.exec_starts > 1 or self.cgroup is None:
            log.info("%s: not looking for strays of a failed exec (%d starts)", self.id, self.exec_starts)
            return
        quiet = 0
        for _ in range(STRAY_SCANS):
            known = {self.init.pid} | {e.pid for e in self.execs if e.pid}
            strays = []
            for pid in self.cgroup.pids():
                _, started, state = _stat(pid)
                if started >= since and state not in ("", "Z", "X") and not _descends_from(pid, known):
                    strays.append(pid)
            for pid in strays:
                log.info("%s: killing %d, left by a failed exec", self.id, pid)
                # A descendant of ours, not reaped yet (we are its subreaper): the pid is its own.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            quiet = 0 if strays else quiet + 1
            if quiet >= STRAY_QUIET_SCANS:
                return
            await asyncio.sleep(STRAY_SCAN_PAUSE)

    async def kill_all(self, signal: int) -> None:
        try:
            await self.runc.kill(self.id, signal, all=True)
        except RuncError as e:
            if runc_command.is_gone(str(e)):
                return  # runc kill --all on a stopped container succeeds (spec §7.2)
            raise

    async def pause(self) -> None:
        await self.runc.pause(self.id)

    async def resume(self) -> None:
        await self.runc.resume(self.id)

    async def update(self, resources_json: bytes) -> None:
        await self.runc.update(self.id, resources_json)

    async def pids(self) -> list[int]:
        return await self.runc.ps(self.id)

    async def stats(self) -> tuple[str, bytes]:
        return cgroups.metrics(self.cgroup)

    async def delete(self) -> None:
        if self._deleted:
            return
        self.backend.oom.remove(self.id)
        try:
            await self.runc.delete(self.id)
        except RuncError as e:
            if not runc_command.is_missing(str(e)):
                raise
        self._deleted = True
        await self.init.close()
        await self._unmount()

    async def _unmount(self) -> None:
        if self._mounted:
            await off_loop(mounts.unmount_all, self.rootfs)
            self._mounted = False


class RuncBackend(Backend):
    name = "process"
    lazy_modules = cgroups.METRICS_MODULES

    def __init__(self, settings: RuncSettings, namespace: str, on_oom: Callable[[str], None]) -> None:
        self.settings = settings
        self.namespace = namespace
        self.oom = OOMWatcher(on_oom)

    def runc_for(self, bundle: str) -> Runc:
        s = self.settings
        return Runc(
            binary=s.binary,
            root=os.path.join(s.root, self.namespace),
            log=os.path.join(bundle, "log.json"),
            systemd_cgroup=s.systemd_cgroup,
        )

    async def create_container(self, req: ContainerRequest) -> Container:
        c = RuncContainer(self, req, self.runc_for(req.bundle))
        await c.create()
        return c

    async def close(self) -> None:
        self.oom.close()
