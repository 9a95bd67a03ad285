"""The small interface every isolation backend (runc, host, vm) implements.

The task and exec layers own states, waiters and events; a backend only makes processes
happen somewhere and reports their exits.  One ``Backend`` serves a whole pod (or one
standalone task); it makes ``Container``s, and a container makes ``Process``es.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from podshim.system.mounts import Mount
from podshim.system.reaper import Exit
from podshim.system.stdio import ProcessIO, StdioConfig

ExitCallback = Callable[[int, float], None]
"""Called once with (exit status, unix time of the exit)."""


class ProcessGone(Exception):
    """The process is not running any more (runc: "container not running")."""


@dataclass
class ContainerRequest:
    """What Create hands a backend: the bundle, its parsed spec and the client's stdio."""

    id: str
    bundle: str
    spec: dict[str, Any]
    rootfs: list[Mount]
    stdio: StdioConfig
    namespace: str
    options: dict[str, Any] = field(default_factory=dict)


class Process(abc.ABC):
    """One process: a container's init, or an exec."""

    pid: int = 0

    @abc.abstractmethod
    def on_exit(self, callback: ExitCallback) -> None:
        """Call back once when the process exits, whatever its state: a created init can be
        killed before it ever starts, and a started one may exit before start() returns."""

    @abc.abstractmethod
    async def start(self) -> int:
        """Run it; return its host pid."""

    @abc.abstractmethod
    async def kill(self, signal: int) -> None:
        """Signal it; raise ProcessGone if it has exited."""

    @abc.abstractmethod
    def resize(self, width: int, height: int) -> None: ...

    @abc.abstractmethod
    def close_stdin(self) -> None: ...

    @abc.abstractmethod
    async def drain(self) -> None:
        """Wait, bounded, for the process's output to reach the client."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release stdio and whatever else the process holds.  Idempotent."""


class ReapedProcess(Process):
    """A process whose exit the shim's reaper reports: the exit is remembered, and passed to the
    exec layer's callback exactly once, whichever of the two comes first."""

    def __init__(self) -> None:
        self._exit: Exit | None = None
        self._exit_callback: ExitCallback | None = None

    def exited(self, ex: Exit) -> None:
        self._exit = ex
        if self._exit_callback is not None:
            cb, self._exit_callback = self._exit_callback, None
            cb(ex.status, ex.at)

    def on_exit(self, callback: ExitCallback) -> None:
        if self._exit is not None:
            callback(self._exit.status, self._exit.at)
        else:
            self._exit_callback = callback


class PipedProcess(ReapedProcess):
    """A process on this host whose stdio the shim pipes itself (runc and host backends): the
    stdio calls go to its ProcessIO once it has one, and a CloseIO that came first is kept."""

    def __init__(self, pio: ProcessIO | None = None) -> None:
        super().__init__()
        self.pio = pio
        self._stdin_closed = False

    def resize(self, width: int, height: int) -> None:
        if self.pio is not None:
            self.pio.resize(width, height)

    def close_stdin(self) -> None:
        self._stdin_closed = True
        if self.pio is not None:
            self.pio.close_stdin()

    async def drain(self) -> None:
        if self.pio is not None:
            await self.pio.drain()


class Container(abc.ABC):
    id: str
    init: Process

    @property
    @abc.abstractmethod
    def shares_pid_namespace(self) -> bool:
        """True when the init's exit does not take its descendants with it (spec §5.4)."""

    @abc.abstractmethod
    async def new_exec(self, exec_id: str, process_spec: dict[str, Any], stdio: StdioConfig) -> Process: ...

    @abc.abstractmethod
    async def kill_all(self, signal: int) -> None:
        """Signal every process of the container."""

    @abc.abstractmethod
    async def pause(self) -> None: ...

    @abc.abstractmethod
    async def resume(self) -> None: ...

    @abc.abstractmethod
    async def update(self, resources_json: bytes) -> None: ...

    @abc.abstractmethod
    async def pids(self) -> list[int]: ...

    @abc.abstractmethod
    async def stats(self) -> tuple[str, bytes]:
        """(type url, encoded metrics)."""

    @abc.abstractmethod
    async def delete(self) -> None:
        """Remove the container and its rootfs mounts.  Idempotent."""


class Backend(abc.ABC):
    """An isolation mode, for one pod or one standalone task."""

    name: str
    lazy_modules: tuple[str, ...] = ()
    """Modules the backend imports only where it uses them, so that shims that never need them
    do not pay for them.  ``preload`` imports them when the backend is created: a shim that
    lives through a package upgrade must never load new code into its old process."""

    @classmethod
    def preload(cls) -> None:
        for name in cls.lazy_modules:
            importlib.import_module(name)
    sandbox_owns_workloads = False
    """Whether a pod's workloads die with its sandbox.  Not for process pods (runc-v2: a container
    with its own pid namespace outlives the pause process, and CRI expects it to stay RUNNING)
    nor for host pods (the seed's job-container sandbox is a task with no process, whose exit
    touches nobody); yes for VM pods, where the VM is the sandbox."""

    @abc.abstractmethod
    async def create_container(self, req: ContainerRequest) -> Container:
        """Create (not start) a container; its init process exists with a real pid on return."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release what the backend holds for the whole pod (a VM, a holder process)."""
