"""Host isolation: host-process pods (the seed's job containers, Kubernetes HostProcess).

A workload runs straight on the host: no runc and no new namespaces, but with the spec's
args, env, user and rlimits, in a cgroup of its own (so stats, OOM, update, pause and kill-all
work, reparented grandchildren included).  The image's root filesystem is mounted and handed to
the process as ``$CONTAINER_SANDBOX_MOUNT_POINT``, which is also its working directory's root.

The sandbox has no process at all: see ``sandbox.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Callable
from typing import Any

from podshim import errdefs, oci, policy
from podshim.backends.base import Backend, Container, ContainerRequest, PipedProcess, Process, ProcessGone
from podshim.backends.host import leftovers
from podshim.backends.host.launch import Held, LaunchSpec, env_of, rlimits_of, spawn_held
from podshim.backends.host.sandbox import SandboxHolder
from podshim.options import ShimOptions
from podshim.system import cgroups, mounts
from podshim.system.blocking import off_loop
from podshim.system.cgroups import Cgroup, OOMWatcher
from podshim.system.stdio import ProcessIO, StdioConfig

MOUNT_POINT_ENV = "CONTAINER_SANDBOX_MOUNT_POINT"


class HostProcess(PipedProcess):
    def __init__(self, container: HostContainer, process_spec: dict[str, Any], stdio: StdioConfig) -> None:
        super().__init__()
        self.container = container
        self.spec = process_spec
        self.stdio = stdio
        self._held: Held | None = None

    async def prepare(self) -> None:
        """Create: open stdio and fork the process, held before exec."""
        c = self.container
        self.pio = await ProcessIO.open(self.stdio, container_id=c.id, namespace=c.req.namespace)
        master = slave = None
        if self.stdio.terminal:
            master, slave = os.openpty()
        try:
            self._held = spawn_held(self._launch_spec(slave))
        except BaseException:
            for fd in (master, slave):
                if fd is not None:
                    os.close(fd)
            await self.pio.close()
            raise
        if slave is not None:
            os.close(slave)
        if master is not None:
            self.pio.attach_console(master)
        self.pio.started()
        self.pid = self._held.pid
        self._held.exited.add_done_callback(lambda f: self.exited(f.result()))

    def _launch_spec(self, tty_slave: int | None) -> LaunchSpec:
        c = self.container
        p = self.spec
        env = env_of(p.get("env") or [])
        env[MOUNT_POINT_ENV] = c.mount_point
        user = p.get("user") or {}
        inherit = oci.of(c.req.spec).get(oci.HOSTPROCESS_INHERIT_USER, "").lower() == "true"
        cwd = os.path.join(c.mount_point, str(p.get("cwd") or "/").lstrip("/"))
        args = [str(a) for a in p.get("args") or []]
        if not args:
            raise errdefs.InvalidArgument("the process has no args")
        return LaunchSpec(
            args=args,
            env=env,
            cwd=cwd,
            uid=None if inherit else int(user.get("uid", 0)),
            gid=None if inherit else int(user.get("gid", 0)),
            additional_gids=[int(g) for g in user.get("additionalGids") or []],
            rlimits=rlimits_of(p),
            cgroup=c.cgroup,
            stdio=self.pio.child_stdio if self.pio is not None else None,
            tty_slave=tty_slave,
        )

    async def start(self) -> int:
        if self._held is None:
            await self.prepare()
        assert self._held is not None and self.pio is not None
        if self._stdin_closed:
            self.pio.close_stdin()
        try:
            await self._held.release()
        except errdefs.ShimError:
            await self.pio.close()
            raise
        return self.pid

    async def kill(self, sig: int) -> None:
        if self._exit is not None or not self.pid:
            raise ProcessGone()
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError as e:
            raise ProcessGone() from e

    async def close(self) -> None:
        if self._held is not None and self._exit is None:
            self._held.abandon()  # a never-started child reads EOF and exits without running
        if self.pio is not None:
            await self.pio.close()


class HostContainer(Container):
    def __init__(self, backend: HostBackend, req: ContainerRequest, location: str) -> None:
        self.backend = backend
        self.req = req
        self.id = req.id
        self.mount_point = os.path.join(location, req.id) if location else os.path.join(req.bundle, "rootfs")
        self._made_mount_point = False
        linux = req.spec.get("linux") or {}
        self.cgroup: Cgroup = cgroups.cgroup_at(
            _cgroupfs_path(linux.get("cgroupsPath") or "", req.namespace, req.id)
        )
        self._mounted = False
        self._deleted = False

    @property
    def shares_pid_namespace(self) -> bool:
        return True  # the host's: an exited init's descendants are not killed by the kernel

    async def create(self) -> None:
        try:
            self._record()
            if self.req.rootfs:
                if not os.path.isdir(self.mount_point):
                    os.makedirs(self.mount_point, mode=0o755)
                    self._made_mount_point = True
                self._mounted = True  # before the await: a cancelled Create unmounts what got mounted
                await off_loop(mounts.mount_all, self.req.rootfs, self.mount_point)
            cgroups.create(self.cgroup)
            resources = (self.req.spec.get("linux") or {}).get("resources") or {}
            cgroups.set_resources(self.cgroup, resources)
            init = HostProcess(self, self.req.spec.get("process") or {}, self.req.stdio)
            await init.prepare()
            self.init = init
        except BaseException:
            await self._release_resources()
            raise
        self.backend.oom.add(self.id, self.cgroup)

    async def new_exec(self, exec_id: str, process_spec: dict[str, Any], stdio: StdioConfig) -> Process:
        return HostProcess(self, process_spec, stdio)

    async def kill_all(self, sig: int) -> None:
        # Every process in the cgroup, also the ones that escaped to init or daemonised.
        for _ in range(100):
            pids = self.cgroup.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if sig != signal.SIGKILL:
                return
            await asyncio.sleep(0.01)

    async def pause(self) -> None:
        cgroups.freeze(self.cgroup, True)

    async def resume(self) -> None:
        cgroups.freeze(self.cgroup, False)

    async def update(self, resources_json: bytes) -> None:
        cgroups.set_resources(self.cgroup, json.loads(resources_json or b"{}"))

    async def pids(self) -> list[int]:
        return self.cgroup.pids()

    async def stats(self) -> tuple[str, bytes]:
        return cgroups.metrics(self.cgroup)

    async def delete(self) -> None:
        if self._deleted:
            return
        self._deleted = True
        self.backend.oom.remove(self.id)
        await self.kill_all(signal.SIGKILL)
        await self.init.close()
        await self._release_resources()

    def _record(self) -> None:
        made = bool(self.req.rootfs) and not os.path.isdir(self.mount_point)
        leftovers.write(self.req.bundle, self.cgroup, self.mount_point, made)

    async def _release_resources(self) -> None:
        with contextlib.suppress(OSError):  # as before: a cgroup that will not go is left, not fatal
            await cgroups.remove(self.cgroup)
        if self._mounted:
            await off_loop(mounts.unmount_all, self.mount_point)
            self._mounted = False
        if self._made_mount_point:
            with contextlib.suppress(OSError):
                os.rmdir(self.mount_point)
            self._made_mount_point = False
        if not self.cgroup.exists():
            leftovers.forget(self.req.bundle)


def _cgroupfs_path(path: str, namespace: str, cid: str) -> str:
    """The spec's cgroupsPath in cgroupfs form; systemd's slice:prefix:name is mapped onto it."""
    if not path:
        return f"/{namespace}/{cid}"
    if ":" in path and not path.startswith("/"):
        slice_, prefix, name = [*path.split(":"), "", ""][:3]
        return "/" + "/".join(p for p in (slice_, f"{prefix}-{name}" if prefix else name) if p)
    return path


class HostBackend(Backend):
    name = "host"
    lazy_modules = cgroups.METRICS_MODULES

    def __init__(self, namespace: str, on_oom: Callable[[str], None], options: ShimOptions) -> None:
        self.namespace = namespace
        self.oom = OOMWatcher(on_oom)
        self.options = options

    async def create_container(self, req: ContainerRequest) -> Container:
        # Checked for the sandbox too, whose annotation every container inherits: a pod that
        # asks for a location its handler does not allow fails at RunPodSandbox.
        location = policy.host_rootfs_location(self.options, req.spec)
        kind, _ = oci.sandbox_type_and_id(req.spec)
        if kind is oci.ContainerType.SANDBOX:
            return SandboxHolder(req)
        c = HostContainer(self, req, location)
        await c.create()
        return c

    async def close(self) -> None:
        self.oom.close()
