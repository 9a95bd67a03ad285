"""``podshim.diag.v1.Diag``: what an operator can ask a shim, beside the Task API on its socket.

Loaded at the first Diag request (the server registers it lazily), so a shim nobody inspects
pays nothing for it.  The same peer check as the Task API guards it: only the shim's own uid
(root) may connect, which is also who may run commands on the node anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.message import Message

from podshim import errdefs, oci
from podshim.api import diag_pb2 as D
from podshim.events import timestamp
from podshim.pod import Pod
from podshim.process import Exec, ExecState
from podshim.service import TaskService
from podshim.shim import logfmt, stacks
from podshim.shim.telemetry import TELEMETRY, Histogram, Telemetry
from podshim.system import reaper
from podshim.system.stdio import pump
from podshim.task import Task
from podshim.ttrpc.server import Method, RequestContext

SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"
CONTAINER_NAME = "io.kubernetes.cri.container-name"
EXEC_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STDIN, STDOUT, STDERR = 0, 1, 2


def proc_memory(pid: int | str = "self") -> tuple[int, int]:
    """(RSS, PSS) in bytes from smaps_rollup; zeros when unreadable."""
    rss = pss = 0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key == "Rss":
                rss = int(rest.split()[0]) * 1024
            elif key == "Pss":
                pss = int(rest.split()[0]) * 1024
    return rss, pss


def proc_cpu_seconds(pid: int | str = "self") -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_threads(pid: int | str = "self") -> int:
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def state_name(task: Task, e: Exec) -> str:
    if e.state is ExecState.DELETED:
        return "deleted"
    return task.status_of(e).name.lower()


def validate_stdio_socket(name: str) -> str:
    """An absolute path or an abstract name ("@name"), within sun_path."""
    if name and (name[0] not in "/@" or len(name) > 107 or "\0" in name):
        raise errdefs.InvalidArgument(f"stdio socket {name!r} is neither an absolute path nor @name")
    return name


async def connect_stdio(name: str, streams: tuple[int, ...]) -> dict[int, socket.socket]:
    """One connection per stream to the client's abstract socket, each announced by its number."""
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


def add_histogram(f: D.MetricFamily, h: Histogram, labels: dict[str, str]) -> None:
    f.samples.add(labels=labels, value=h.sum, count=h.count,
                  bucket_bounds=[*h.bounds, float("inf")], bucket_counts=h.cumulative())  # fmt: skip


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
        return D.MetricsResponse(families=self.families())

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

    # -- metrics ---------------------------------------------------------------------------------

    def families(self) -> list[D.MetricFamily]:
        t = self.telemetry
        fams: list[D.MetricFamily] = []

        def fam(name: str, kind: str, help: str) -> D.MetricFamily:
            f = D.MetricFamily(name=name, type=kind, help=help)
            fams.append(f)
            return f

        f = fam(
            "podshim_ttrpc_requests_total", "counter", "ttrpc requests served, by service, method and code"
        )
        from podshim.errdefs import Code

        for (service, method, code), n in sorted(t.requests.items()):
            f.samples.add(labels={"service": service, "method": method, "code": Code(code).name}, value=n)
        f = fam("podshim_ttrpc_request_duration_seconds", "histogram", "ttrpc request latency")
        for (service, method), h in sorted(t.latency.items()):
            add_histogram(f, h, {"service": service, "method": method})

        tasks = self._tasks()
        by_task: dict[str, int] = {}
        by_exec: dict[str, int] = {}
        for task in tasks:
            s = state_name(task, task.init)
            by_task[s] = by_task.get(s, 0) + 1
            for e in task.execs.values():
                s = state_name(task, e)
                by_exec[s] = by_exec.get(s, 0) + 1
        f = fam("podshim_tasks", "gauge", "tasks (containers) by state")
        for s, n in sorted(by_task.items()):
            f.samples.add(labels={"state": s}, value=n)
        f = fam("podshim_execs", "gauge", "additional execs by state")
        for s, n in sorted(by_exec.items()):
            f.samples.add(labels={"state": s}, value=n)

        f = fam("podshim_events_total", "counter", "task events: published, retried (per attempt), dropped")
        for outcome, n in t.events.items():
            f.samples.add(labels={"outcome": outcome}, value=n)

        rss, pss = proc_memory()
        cpu = proc_cpu_seconds()
        fam("podshim_shim_open_fds", "gauge", "the shim's open file descriptors").samples.add(
            value=len(os.listdir("/proc/self/fd"))
        )
        fam("podshim_shim_threads", "gauge", "the shim's threads").samples.add(value=proc_threads())
        f = fam(
            "podshim_shim_memory_bytes",
            "gauge",
            "the shim's resident memory (rss) and proportional share (pss)",
        )
        f.samples.add(labels={"kind": "rss"}, value=rss)
        f.samples.add(labels={"kind": "pss"}, value=pss)
        fam("podshim_shim_cpu_seconds_total", "counter", "the shim's CPU time").samples.add(value=cpu)
        fam("podshim_shim_start_time_seconds", "gauge", "when the shim started (unix time)").samples.add(
            value=t.started_at
        )

        names = {task.id: oci.of(task.spec).get(CONTAINER_NAME, "") or task.id for task in tasks}
        f1 = fam("podshim_container_create_to_start_seconds", "gauge", "from Create to the init's start")
        f2 = fam(
            "podshim_container_start_to_exit_seconds", "gauge", "from the init's start to its first exit"
        )
        for (cid, eid), lc in t.lifecycles.items():
            if eid or cid not in names:
                continue
            labels = {"container": names[cid], "container_id": cid}
            if lc.started:
                f1.samples.add(labels=labels, value=lc.started - lc.created)
                if lc.exited:
                    f2.samples.add(labels=labels, value=lc.exited - lc.started)
        f = fam("podshim_create_to_start_seconds", "histogram", "Create to start, all containers")
        add_histogram(f, t.create_to_start, {})
        f = fam("podshim_start_to_exit_seconds", "histogram", "start to first exit, all containers")
        add_histogram(f, t.start_to_exit, {})

        vm_rss = vm_pss = 0
        vm_cpu = 0.0
        vm = self._vm()
        if vm is not None:
            from podshim.backends.vm import diag as vmdiag

            fams.extend(vmdiag.families(vm, t))
            vm_rss, vm_pss, vm_cpu = vmdiag.qemu_usage(vm)
        f = fam("podshim_pod_overhead_memory_bytes", "gauge",
                "what the pod costs beyond its containers: the shim plus qemu (rss, pss)")  # fmt: skip
        f.samples.add(labels={"kind": "rss"}, value=rss + vm_rss)
        f.samples.add(labels={"kind": "pss"}, value=pss + vm_pss)
        fam("podshim_pod_overhead_cpu_seconds_total", "counter",
            "CPU time of the shim plus qemu").samples.add(value=cpu + vm_cpu)  # fmt: skip
        return fams


async def host_exec(
    argv: list[str], env: dict[str, str], tty: bool, conns: dict[int, socket.socket], width: int, height: int
) -> int:
    """A command in the shim's own namespaces, a child of the shim's reaper."""
    env = {"PATH": EXEC_PATH, **env}
    exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env["PATH"])
    if exe is None or not os.access(exe, os.X_OK):
        raise errdefs.NotFound(f"{argv[0]}: no such executable (PATH={env['PATH']})")
    if not tty:
        for s in conns.values():
            s.setblocking(True)  # the flag is the socket's, shared with the child
        fds = {stream: s.fileno() for stream, s in conns.items()}
        _, exited = reaper.spawn_with_fds([exe, *argv[1:]], fds, env)
        for s in conns.values():
            s.close()  # the child has them now; its exit is our peer's EOF
        return (await exited).status
    master, slave = os.openpty()
    try:
        if width and height:
            import fcntl
            import struct
            import termios

            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
        _, exited = reaper.spawn_with_fds(
            [exe, *argv[1:]], {0: slave, 1: slave, 2: slave}, {"TERM": "xterm", **env}
        )
        os.close(slave)
        slave = -1
        copies = []
        if STDOUT in conns:
            copies.append(asyncio.ensure_future(pump(master, conns[STDOUT].fileno())))
        if STDIN in conns:
            copies.append(asyncio.ensure_future(pump(conns[STDIN].fileno(), master)))
        status = (await exited).status
        if copies:
            await asyncio.wait(copies[:1], timeout=5.0)  # the output, up to the pty's EIO
        for c in copies:
            c.cancel()
        return status
    finally:
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)
