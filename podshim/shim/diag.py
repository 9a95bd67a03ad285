"""``podshim.diag.v1.Diag``: what an operator can ask a shim, beside the Task API on its socket.

Loaded at the first Diag request (the server registers it lazily), so a shim nobody inspects
pays nothing for it.  The same peer check as the Task API guards it: only the shim's own uid
(root) may connect, which is also who may run commands on the node anyway.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.message import Message

from podshim import errdefs, oci
from podshim.api import diag_pb2 as D
from podshim.events import timestamp
from podshim.pod import Pod
from podshim.process import Exec
from podshim.service import TaskService
from podshim.shim import figures, logfmt, stacks
from podshim.shim.figures import CONTAINER_NAME, proc_cpu_seconds, proc_memory, state_name
from podshim.shim.hostexec import STDERR, STDIN, STDOUT, host_exec
from podshim.shim.telemetry import TELEMETRY, Telemetry
from podshim.task import Task
from podshim.ttrpc.server import Method, RequestContext

SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"


def validate_stdio_socket(name: str) -> str:
    """An absolute path or an abstract name ("@name"), within sun_path."""
    if name and (name[0] not in "/@" or len(name) > 107 or "\0" in name):
        raise errdefs.InvalidArgument(f"stdio socket {name!r} is neither an absolute path nor @name")
    return name


async def connect_stdio(name: str, streams: tuple[int, ...]) -> dict[int, socket.socket]:
    """One connection per stream to the client's socket, each announced by its number."""
    loop = asyncio.get_running_loop()
    conns: dict[int, socket.socket] = {}
    try:
        for stream in streams:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            conns[stream] = s
            s.setblocking(False)
            await loop.sock_connect(s, "\0" + name[1:] if name.startswith("@") else name)
            await loop.sock_sendall(s, bytes([stream]))
    except OSError as e:
        for s in conns.values():
            s.close()
        raise errdefs.FailedPrecondition(f"cannot connect to the client's stdio socket {name}: {e}") from e
    return conns


class DiagService:
    def __init__(
        self,
        tasks: TaskService,
        *,
        namespace: str,
        containerd_address: str,
        socket: str,
        bundle: str,
        telemetry: Telemetry = TELEMETRY,
    ) -> None:
        self.service = tasks
        self.namespace = namespace
        self.containerd_address = containerd_address
        self.socket = socket
        self.bundle = bundle
        self.telemetry = telemetry

    def methods(self) -> dict[str, Method]:
        table: dict[str, tuple[type[Message], Callable[[Any], Awaitable[Message]]]] = {
            "Tasks": (D.TasksRequest, self.tasks),
            "Stacks": (D.StacksRequest, self.stacks),
            "Exec": (D.ExecRequest, self.exec),
            "Share": (D.ShareRequest, self.share),
            "Metrics": (D.MetricsRequest, self.metrics),
            "Logs": (D.LogsRequest, self.logs),
            "Pid": (D.PidRequest, self.pid),
            "Version": (D.VersionRequest, self.version),
        }

        def adapt(
            fn: Callable[[Any], Awaitable[Message]],
        ) -> Callable[[Message, RequestContext], Awaitable[Message]]:
            return lambda req, ctx: fn(req)

        return {name: Method(rt, adapt(fn)) for name, (rt, fn) in table.items()}

    # -- what the shim hosts ---------------------------------------------------------------------

    def _tasks(self) -> list[Task]:
        host = self.service.host
        return host.list_tasks() if host is not None else []

    def _vm(self) -> Any:
        """The pod's VM backend, or None (imported only for VM pods)."""
        host = self.service.host
        if host is not None and host.backend.name == "vm":
            return host.backend
        return None

    def isolation(self) -> str:
        host = self.service.host
        return host.backend.name if host is not None else ""

    def pod_info(self) -> D.PodInfo:
        host = self.service.host
        info = D.PodInfo(isolation=self.isolation())
        if isinstance(host, Pod):
            ann = oci.of(host.spec)
            info.id = host.id
            info.name = ann.get(SANDBOX_NAME, "")
            info.namespace = ann.get(SANDBOX_NAMESPACE, "")
            info.uid = ann.get(SANDBOX_UID, "")
        elif logfmt.HANDLER is not None:
            info.id = logfmt.HANDLER.pod
        return info

    def shim_info(self) -> D.ShimInfo:
        from podshim.shim.main import VERSION

        rss, pss = proc_memory()
        info = D.ShimInfo(
            pid=os.getpid(),
            version=VERSION,
            namespace=self.namespace,
            containerd_address=self.containerd_address,
            socket=self.socket,
            started_at=timestamp(self.telemetry.started_at),
            rss_bytes=rss,
            pss_bytes=pss,
            cpu_seconds=proc_cpu_seconds(),
        )
        vm = self._vm()
        if vm is not None and vm.vm is not None and vm.vm.alive:
            info.vm_pid = vm.vm.pid
            mem = vm.memory()
            info.vm_rss_bytes, info.vm_pss_bytes = mem["rss"], mem["pss"]
        return info

    def exec_info(self, task: Task, e: Exec) -> D.ExecInfo:
        lc = self.telemetry.lifecycles.get((task.id, e.exec_id))
        info = D.ExecInfo(
            id=e.exec_id,
            pid=e.pid,
            state=state_name(task, e),
            exit_status=e.exit_status,
            terminal=e.stdio.terminal,
            exited_at=timestamp(e.exited_at),
        )
        if lc is not None:
            info.created_at.FromNanoseconds(int(lc.created * 1e9))
            if lc.started:
                info.started_at.FromNanoseconds(int(lc.started * 1e9))
        return info

    def task_info(self, task: Task) -> D.TaskInfo:
        host = self.service.host
        kind = "standalone"
        if isinstance(host, Pod):
            kind = "sandbox" if task is host.sandbox else "container"
        return D.TaskInfo(
            id=task.id,
            bundle=task.bundle,
            kind=kind,
            name=oci.of(task.spec).get(CONTAINER_NAME, ""),
            init=self.exec_info(task, task.init),
            execs=[self.exec_info(task, e) for e in task.execs.values()],
        )

    # -- Diag ------------------------------------------------------------------------------------

    async def tasks(self, r: D.TasksRequest) -> D.TasksResponse:
        return D.TasksResponse(
            shim=self.shim_info(), pod=self.pod_info(), tasks=[self.task_info(t) for t in self._tasks()]
        )

    async def stacks(self, r: D.StacksRequest) -> D.StacksResponse:
        resp = D.StacksResponse(shim=stacks.dump())
        vm = self._vm()
        if vm is not None:
            from podshim.backends.vm import diag as vmdiag

            try:
                resp.guest = await vmdiag.guest_stacks(vm)
            except errdefs.ShimError as e:
                resp.guest_error = logfmt.printable(str(e))
        return resp

    async def exec(self, r: D.ExecRequest) -> D.ExecResponse:
        if not r.args:
            raise errdefs.InvalidArgument("exec needs a command")
        name = validate_stdio_socket(r.stdio_socket)
        env = dict(e.partition("=")[::2] for e in r.env if "=" in e)
        streams = (STDIN, STDOUT) if r.tty else (STDIN, STDOUT, STDERR)
        vm = self._vm()
        conns = await connect_stdio(name, streams) if name else {}
        try:
            if vm is not None:
                from podshim.backends.vm import diag as vmdiag

                code = await vmdiag.guest_exec(vm, list(r.args), env, r.tty, conns, r.width, r.height)
                return D.ExecResponse(exit_code=code, where="guest")
            code = await host_exec(list(r.args), env, r.tty, conns, r.width, r.height)
            return D.ExecResponse(exit_code=code, where="host")
        finally:
            for s in conns.values():
                s.close()

    async def share(self, r: D.ShareRequest) -> D.ShareResponse:
        vm = self._vm()
        if vm is None:
            iso = self.isolation() or "not created yet"
            raise errdefs.FailedPrecondition(f"share needs a VM pod; this shim's pod is {iso}")
        from podshim.backends.vm import diag as vmdiag

        await vmdiag.share(vm, r.host_path, r.guest_path, r.writable)
        return D.ShareResponse()

    async def metrics(self, r: D.MetricsRequest) -> D.MetricsResponse:
        return D.MetricsResponse(families=figures.families(self.telemetry, self._tasks(), self._vm()))

    async def logs(self, r: D.LogsRequest) -> D.LogsResponse:
        handler = logfmt.HANDLER
        if handler is None:
            return D.LogsResponse()
        lines, dropped = handler.since(r.after)
        return D.LogsResponse(lines=[D.LogLine(seq=s, text=t) for s, t in lines], dropped=dropped)

    async def pid(self, r: D.PidRequest) -> D.PidResponse:
        return D.PidResponse(pid=os.getpid())

    async def version(self, r: D.VersionRequest) -> D.VersionResponse:
        from podshim.shim.main import VERSION

        return D.VersionResponse(version=VERSION, runtime=logfmt.RUNTIME, python=sys.version.split()[0])
