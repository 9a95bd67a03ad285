"""The Task API (``containerd.task.v2.Task``): routes each request to the pod or the
standalone tasks this shim hosts, and turns results into replies (spec §3, §7).

The first Create decides what the shim is: a pod (the sandbox container came first) or a
home for standalone tasks.  Errors are raised where the rule lives; the ttrpc layer maps
their kinds to codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

from podshim import errdefs, ids, oci, options, policy
from podshim.api import runc_options_pb2, task_pb2
from podshim.backends.base import Backend, ContainerRequest
from podshim.backends.runc.backend import RuncBackend, RuncSettings
from podshim.events import Publisher, task_events, timestamp
from podshim.oci import ContainerType
from podshim.pod import Pod
from podshim.process import Exec
from podshim.standalone import Standalone
from podshim.system.blocking import off_loop
from podshim.system.mounts import Mount
from podshim.system.stdio import StdioConfig
from podshim.task import Task
from podshim.ttrpc.server import Handler, Method, RequestContext

log = logging.getLogger(__name__)

SERVICE = "containerd.task.v2.Task"
# Logged at info, once each (with id, exec, method, duration); every request only at debug.
LOGGED_METHODS = frozenset({"Create", "Start", "Delete", "Exec", "Kill", "Shutdown"})
PROCESS_DETAILS_URL = "containerd.runc.v1.ProcessDetails"
Host = Pod | Standalone


def read_spec(bundle: str) -> dict[str, Any]:
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            spec = json.load(f)
    except FileNotFoundError as e:
        raise errdefs.InvalidArgument(f"bundle {bundle} has no config.json") from e
    except ValueError as e:
        raise errdefs.InvalidArgument(f"bundle {bundle}: config.json is not valid JSON: {e}") from e
    if not isinstance(spec, dict):
        raise errdefs.InvalidArgument("config.json is not an OCI spec")
    return spec


class TaskService:
    def __init__(
        self,
        *,
        namespace: str,
        events: Publisher,
        start_options: options.ShimOptions,
        on_shutdown: Callable[[], None],
    ) -> None:
        self.namespace = namespace
        self.events = events
        self.start_options = start_options
        self._on_shutdown = on_shutdown
        self.host: Host | None = None
        self._first_create = asyncio.Lock()

    # -- plumbing --------------------------------------------------------------------------------

    def methods(self) -> dict[str, Method]:
        T = task_pb2
        table: dict[str, tuple[type[Message], Callable[[Any], Awaitable[Message]]]] = {
            "State": (T.StateRequest, self.state),
            "Create": (T.CreateTaskRequest, self.create),
            "Start": (T.StartRequest, self.start),
            "Delete": (T.DeleteRequest, self.delete),
            "Pids": (T.PidsRequest, self.pids),
            "Pause": (T.PauseRequest, self.pause),
            "Resume": (T.ResumeRequest, self.resume),
            "Checkpoint": (T.CheckpointTaskRequest, self.checkpoint),
            "Kill": (T.KillRequest, self.kill),
            "Exec": (T.ExecProcessRequest, self.exec),
            "ResizePty": (T.ResizePtyRequest, self.resize_pty),
            "CloseIO": (T.CloseIORequest, self.close_io),
            "Update": (T.UpdateTaskRequest, self.update),
            "Wait": (T.WaitRequest, self.wait),
            "Stats": (T.StatsRequest, self.stats),
            "Connect": (T.ConnectRequest, self.connect),
            "Shutdown": (T.ShutdownRequest, self.shutdown),
        }

        debug = log.isEnabledFor(logging.DEBUG)

        def adapt(name: str, fn: Callable[[Any], Awaitable[Message]]) -> Handler:
            if not debug and name not in LOGGED_METHODS:
                # No extra coroutine frame per request: hand back the method's own coroutine.
                return lambda req, ctx: fn(req)

            async def logged(req: Message, ctx: RequestContext) -> Message:
                fields = {"method": name, "id": getattr(req, "id", ""), "exec": getattr(req, "exec_id", "")}
                if debug:
                    log.debug("-> %s %s", name, str(req).replace("\n", " "), extra=fields)
                t0 = time.monotonic()
                try:
                    resp = await fn(req)
                except Exception as e:
                    fields["duration"] = f"{time.monotonic() - t0:.6f}s"
                    if debug:
                        log.debug("<- %s error %r", name, e, extra=fields)
                    else:
                        log.info("%s failed: %s", name, e, extra=fields)
                    raise
                fields["duration"] = f"{time.monotonic() - t0:.6f}s"
                if debug:
                    log.debug("<- %s %s", name, str(resp).replace("\n", " "), extra=fields)
                else:
                    log.info(name, extra=fields)
                return resp

            return logged

        return {name: Method(rt, adapt(name, fn)) for name, (rt, fn) in table.items()}

    def _task(self, tid: str) -> Task:
        ids.check_task_id(tid)
        if self.host is None:
            raise errdefs.NotFound("container not created")
        return self.host.get_task(tid)

    def _exec(self, tid: str, eid: str) -> tuple[Task, Exec]:
        task = self._task(tid)
        return task, task.get_exec(ids.check_exec_id(eid))

    def _backend(self, req: ContainerRequest, opts: options.ShimOptions) -> Backend:
        backend = self._new_backend(req, opts)
        backend.preload()
        return backend

    def _new_backend(self, req: ContainerRequest, opts: options.ShimOptions) -> Backend:
        isolation = policy.isolation(opts, req.spec)
        if isolation == "process":
            return RuncBackend(
                RuncSettings(
                    binary=opts.binary_name or "runc",
                    root=opts.root or "/run/containerd/runc",
                    systemd_cgroup=opts.systemd_cgroup,
                    no_pivot_root=opts.no_pivot_root,
                    no_new_keyring=opts.no_new_keyring,
                    io_uid=opts.io_uid,
                    io_gid=opts.io_gid,
                ),
                self.namespace,
                self._publish_oom,
            )
        if isolation == "host":
            from podshim.backends.host.backend import HostBackend  # only host-process pods pay for it

            return HostBackend(self.namespace, self._publish_oom, opts)
        if isolation == "vm":
            from podshim.backends.vm.backend import VMBackend  # imported only by VM pods
            from podshim.backends.vm.spec import resolve_params

            # Before qemu starts: a pod asking for more than the handler allows leaves nothing.
            params = resolve_params(opts.vm, oci.of(req.spec), source=opts.describe_source())
            return VMBackend(params, oci.grouping_key(req.spec, req.id), self._publish_oom)
        raise errdefs.InvalidArgument(
            f"unknown isolation '{isolation}' in '{oci.ISOLATION}': want {', '.join(options.MODES)}"
        )

    def _publish_oom(self, container_id: str) -> None:
        self.events.publish(*task_events.oom(container_id))

    # -- Task API ------------------------------------------------------------------------------

    async def create(self, r: task_pb2.CreateTaskRequest) -> task_pb2.CreateTaskResponse:
        ids.check_task_id(r.id)
        if r.checkpoint:
            raise errdefs.NotImplementedErr("restoring from a checkpoint")
        spec = await off_loop(read_spec, r.bundle)
        oci.grouping_key(spec, r.id)  # names the shim's socket and a VM's run dir: checked here too
        opts = options.decode(r.options) if r.HasField("options") else self.start_options
        if opts.problem:
            raise errdefs.InvalidArgument(opts.problem)
        req = ContainerRequest(
            id=r.id,
            bundle=r.bundle,
            spec=spec,
            rootfs=[Mount(m.type, m.source, tuple(m.options), m.target) for m in r.rootfs],
            stdio=StdioConfig(r.stdin, r.stdout, r.stderr, r.terminal),
            namespace=self.namespace,
        )
        await off_loop(_write_options, r.bundle, opts)
        if self.host is None:
            async with self._first_create:
                if self.host is None:
                    # The backend's modules, and all it imports late, load now and on a worker
                    # thread: reading and running them held the loop for 100+ ms (VM pods).
                    isolation = policy.isolation(opts, req.spec)
                    if isolation in BACKEND_MODULES:
                        await asyncio.to_thread(import_backend, isolation)
                    task = await self._create_host(req, opts)
                    return task_pb2.CreateTaskResponse(pid=task.init.pid)
        assert self.host is not None
        task = await self.host.create_task(req)
        return task_pb2.CreateTaskResponse(pid=task.init.pid)

    async def _create_host(self, req: ContainerRequest, opts: options.ShimOptions) -> Task:
        kind, _ = oci.sandbox_type_and_id(req.spec)
        if kind is ContainerType.SANDBOX:
            pod = await Pod.create(req, lambda rq: self._backend(rq, opts), self.events)
            self.host = pod
            return pod.sandbox
        if kind is ContainerType.CONTAINER:
            raise errdefs.FailedPrecondition(
                f"container {req.id} belongs to pod {oci.of(req.spec)[oci.SANDBOX_ID]}, "
                "whose sandbox is not in this shim"
            )
        standalone = Standalone(self._backend(req, opts), self.events)
        try:
            task = await standalone.create_task(req)
        except BaseException:
            await standalone.close()
            raise
        self.host = standalone
        return task

    async def start(self, r: task_pb2.StartRequest) -> task_pb2.StartResponse:
        task, e = self._exec(r.id, r.exec_id)
        pid = await e.start()
        if isinstance(self.host, Pod) and task is self.host.sandbox:
            self.host.watch_sandbox()
        return task_pb2.StartResponse(pid=pid)

    async def delete(self, r: task_pb2.DeleteRequest) -> task_pb2.DeleteResponse:
        task = self._task(r.id)
        assert self.host is not None
        eid = ids.check_exec_id(r.exec_id)
        info = await (task.delete(eid) if eid else self.host.delete_task(r.id))
        return task_pb2.DeleteResponse(
            pid=info.pid, exit_status=info.status, exited_at=timestamp(info.exited_at)
        )

    async def state(self, r: task_pb2.StateRequest) -> task_pb2.StateResponse:
        task, e = self._exec(r.id, r.exec_id)
        return task_pb2.StateResponse(
            id=e.exec_id or task.id,
            bundle=task.bundle,
            pid=e.pid,
            status=task.status_of(e).value,  # type: ignore[arg-type]
            stdin=e.stdio.stdin,
            stdout=e.stdio.stdout,
            stderr=e.stdio.stderr,
            terminal=e.stdio.terminal,
            exit_status=e.exit_status,
            exited_at=timestamp(e.exited_at),
        )

    async def exec(self, r: task_pb2.ExecProcessRequest) -> empty_pb2.Empty:
        task = self._task(r.id)
        ids.check_exec_id(r.exec_id)
        if not r.HasField("spec") or not r.spec.value:
            raise errdefs.InvalidArgument("exec spec is required")
        try:
            spec = json.loads(r.spec.value)
        except ValueError as e:
            raise errdefs.InvalidArgument(f"exec spec is not a JSON OCI process: {e}") from e
        if not isinstance(spec, dict) or not spec.get("args"):
            raise errdefs.InvalidArgument("exec spec must be an OCI process with args")
        await task.create_exec(r.exec_id, spec, StdioConfig(r.stdin, r.stdout, r.stderr, r.terminal))
        return empty_pb2.Empty()

    async def kill(self, r: task_pb2.KillRequest) -> empty_pb2.Empty:
        ids.check_task_id(r.id)
        ids.check_exec_id(r.exec_id)
        if self.host is None:
            raise errdefs.NotFound("container not created")
        await self.host.kill_task(r.id, r.exec_id, r.signal, r.all)
        return empty_pb2.Empty()

    async def wait(self, r: task_pb2.WaitRequest) -> task_pb2.WaitResponse:
        _, e = self._exec(r.id, r.exec_id)
        info = await e.wait()
        return task_pb2.WaitResponse(exit_status=info.status, exited_at=timestamp(info.exited_at))

    async def pids(self, r: task_pb2.PidsRequest) -> task_pb2.PidsResponse:
        task = self._task(r.id)
        out = task_pb2.PidsResponse()
        for pid, eid in await task.pids():
            info = out.processes.add(pid=pid)
            if eid:
                info.info.CopyFrom(
                    any_pb2.Any(
                        type_url=PROCESS_DETAILS_URL,
                        value=runc_options_pb2.ProcessDetails(exec_id=eid).SerializeToString(),
                    )
                )
        return out

    async def pause(self, r: task_pb2.PauseRequest) -> empty_pb2.Empty:
        await self._task(r.id).pause()
        return empty_pb2.Empty()

    async def resume(self, r: task_pb2.ResumeRequest) -> empty_pb2.Empty:
        await self._task(r.id).resume()
        return empty_pb2.Empty()

    async def checkpoint(self, r: task_pb2.CheckpointTaskRequest) -> empty_pb2.Empty:
        raise errdefs.NotImplementedErr("checkpoint")

    async def resize_pty(self, r: task_pb2.ResizePtyRequest) -> empty_pb2.Empty:
        _, e = self._exec(r.id, r.exec_id)
        e.resize(r.width, r.height)
        return empty_pb2.Empty()

    async def close_io(self, r: task_pb2.CloseIORequest) -> empty_pb2.Empty:
        _, e = self._exec(r.id, r.exec_id)
        if r.stdin:
            e.close_stdin()
        return empty_pb2.Empty()

    async def update(self, r: task_pb2.UpdateTaskRequest) -> empty_pb2.Empty:
        await self._task(r.id).update(r.resources.value if r.HasField("resources") else b"{}")
        return empty_pb2.Empty()

    async def stats(self, r: task_pb2.StatsRequest) -> task_pb2.StatsResponse:
        url, value = await self._task(r.id).stats()
        return task_pb2.StatsResponse(stats=any_pb2.Any(type_url=url, value=value))

    async def connect(self, r: task_pb2.ConnectRequest) -> task_pb2.ConnectResponse:
        pid = 0
        with contextlib.suppress(errdefs.NotFound, errdefs.InvalidArgument):  # never fails (spec §7.6)
            pid = self._task(r.id).init.pid
        return task_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=pid)

    async def shutdown(self, r: task_pb2.ShutdownRequest) -> empty_pb2.Empty:
        if self.host is None or not self.host.alive:
            self._on_shutdown()
        return empty_pb2.Empty()

    async def close(self) -> None:
        if self.host is not None:
            await self.host.close()


BACKEND_MODULES = {
    "process": ("podshim.backends.runc.backend", "RuncBackend"),
    "host": ("podshim.backends.host.backend", "HostBackend"),
    "vm": ("podshim.backends.vm.backend", "VMBackend"),
}


def import_backend(isolation: str) -> None:
    """Import an isolation's backend module and everything it imports late (``preload``)."""
    module, name = BACKEND_MODULES[isolation]
    backend: type[Backend] = getattr(importlib.import_module(module), name)
    backend.preload()
    if isolation == "vm":
        importlib.import_module("podshim.backends.vm.spec")


def _write_options(bundle: str, opts: options.ShimOptions) -> None:
    """Persist the options: the ``delete`` action needs the runc root and binary."""
    path = os.path.join(bundle, "options.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(opts.to_json())
    os.replace(tmp, path)


