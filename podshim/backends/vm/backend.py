"""Hypervisor isolation: every container of the pod runs in one utility VM, through its agent.

The VM boots at the first container (the sandbox, or a standalone task) and belongs to it: it
closes when that container is deleted and nothing else runs in it, or at ``close()``.  Workloads
don't own it: a workload's init killed with SIGKILL is just a process exit in the guest.

If the VM or its agent dies, every process still running in it is force-exited with status 1, so
the task layer publishes TaskExit for each and CRI sees the pod NOTREADY; the VM is then killed
and its shares removed.  Later operations find the processes exited; deletes still clean up.

Stdio: each process's client side (FIFOs, ``binary://``, ``file://``) is the ordinary
``ProcessIO``; where a local process would hold the child ends of its pipes, the backend holds
them and carries the bytes to and from the guest as channel streams.  For a terminal, a local pty
in raw mode stands in for the child's, so ``ProcessIO`` copies to and from it as for runc's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
import tty
from collections.abc import Callable
from typing import Any

from podshim import errdefs, oci
from podshim.backends.base import Backend, Container, ContainerRequest, ExitCallback, Process, ProcessGone
from podshim.backends.vm import spec as vmspec
from podshim.guest.protocol import ProtocolError
from podshim.system import mounts
from podshim.system.cgroups import V2_METRICS_URL
from podshim.system.stdio import ProcessIO, StdioConfig
from podshim.vm import image as vmimage
from podshim.vm import network, qemu
from podshim.vm import template as vmtemplate
from podshim.vm.client import AgentClient, AgentGone
from podshim.vm.share import PodShare

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 180.0  # TCG with two boots sharing two cores, plus a wait for a boot slot
FORCED_EXIT_STATUS = 1
DRAIN_TIMEOUT = 2.0
# Fault injection for the tests: with this set in the shim's environment, a container annotated
# FAULT_ANNOTATION=agent-crash makes the agent die right after creating it.  Without the env the
# annotation is ignored and the agent refuses the request.
FAULTS_ENV = "PODSHIM_VM_FAULT_INJECTION"
FAULT_ANNOTATION = "podshim.io/vm.fault"
SETUP_ENTROPY_BYTES = 64


def _random_mac() -> str:
    """A locally administered unicast MAC, for a VM without a pod network: no two clones keep
    the template's."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def _close(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


class VMProcess(Process):
    """A process in the guest: a container's init, or an exec."""

    def __init__(self, container: VMContainer, exec_id: str, stdio: StdioConfig) -> None:
        self.container = container
        self.exec_id = exec_id
        self.stdio = stdio
        self.pio: ProcessIO | None = None
        self.status: int | None = None
        self.exited_at = 0.0
        self._on_exit: ExitCallback | None = None
        self._stdin_closed = False
        self._input_fd = -1
        self.process_spec: dict[str, Any] = {}
        self._outputs: list[asyncio.Task[None]] = []
        self._inputs: list[asyncio.Task[None]] = []

    @property
    def key(self) -> tuple[str, str]:
        return self.container.id, self.exec_id

    # -- stdio ------------------------------------------------------------------------------

    async def open_stdio(self) -> dict[str, Any]:
        """Open the client's side and attach its local ends to new channel streams; returns the
        agent's ``stdio`` argument."""
        c = self.container
        client = c.backend.client
        assert client is not None
        self.pio = pio = await ProcessIO.open(self.stdio, container_id=c.id, namespace=c.req.namespace)
        if self._stdin_closed:
            pio.close_stdin()
        cfg = self.stdio
        wire: dict[str, Any] = {"terminal": cfg.terminal}
        if cfg.terminal:
            master, slave = os.openpty()
            tty.setraw(slave)  # the guest's pty already did the line discipline
            pio.attach_console(master)
            if cfg.stdout:
                sid = client.new_stream()
                self._outputs.append(client.attach_output(sid, os.dup(slave)))
                wire["stdout"] = sid
            if cfg.stdin:
                wire["stdin"] = client.new_stream()
                self._input_fd = os.dup(slave)
            os.close(slave)
            return wire
        if pio.child_stdio is None:
            return wire
        in_fd, out_fd, err_fd = pio.child_stdio
        if cfg.stdout:
            wire["stdout"] = client.new_stream()
            self._outputs.append(client.attach_output(wire["stdout"], os.dup(out_fd)))
        if cfg.stderr:
            if cfg.stdout and err_fd == out_fd:
                wire["stderr"] = wire["stdout"]
            else:
                wire["stderr"] = client.new_stream()
                self._outputs.append(client.attach_output(wire["stderr"], os.dup(err_fd)))
        if cfg.stdin:
            wire["stdin"] = client.new_stream()
            self._input_fd = os.dup(in_fd)
        pio.started()
        return wire

    def stdio_created(self, wire: dict[str, Any]) -> None:
        """The guest holds the streams now: start sending stdin."""
        client = self.container.backend.client
        if self._input_fd >= 0 and client is not None:
            self._inputs.append(client.attach_input(int(wire["stdin"]), self._input_fd))
            self._input_fd = -1
        if self.stdio.terminal and self._outputs and self._inputs:
            # A pty has no EOF to pass on: once output ends, stop the input too, so the local
            # pty's master reads EIO and ProcessIO's copies end.
            inputs = list(self._inputs)
            self._outputs[0].add_done_callback(lambda _: [t.cancel() for t in inputs])

    # -- Process ------------------------------------------------------------------------------

    def on_exit(self, callback: ExitCallback) -> None:
        if self.status is not None:
            callback(self.status, self.exited_at)
        else:
            self._on_exit = callback

    def exited(self, status: int, at: float | None = None) -> None:
        if self.status is not None:
            return
        self.status = status
        self.exited_at = at or time.time()
        if self._on_exit is not None:
            cb, self._on_exit = self._on_exit, None
            cb(status, self.exited_at)

    async def start(self) -> int:
        c = self.container
        if self.exec_id == "":
            await c.backend.call("start", id=c.id)
            fault = oci.of(c.req.spec).get(FAULT_ANNOTATION)
            if os.environ.get(FAULTS_ENV) == "1" and fault == "agent-crash":
                log.warning("fault injection: crashing the agent of pod VM %s", c.backend.pod_id)
                asyncio.get_running_loop().create_task(c.backend.quiet_call("crash"))
            return self.pid
        return await self._start_exec()

    async def _start_exec(self) -> int:
        c = self.container
        backend = c.backend
        wire = await self.open_stdio()
        try:
            backend.register(self)
            resp = await backend.call(
                "exec",
                id=c.id,
                exec_id=self.exec_id,
                process=vmspec.guest_process(self.process_spec),
                stdio=wire,
            )
        except BaseException:
            backend.unregister(self)
            await self.close()
            raise
        self.pid = int(resp["pid"])
        self.stdio_created(wire)
        backend.registered_pid(self)
        return self.pid

    async def kill(self, signal: int) -> None:
        if self.status is not None or not self.pid:
            raise ProcessGone()
        c = self.container
        try:
            await c.backend.call("kill", id=c.id, exec_id=self.exec_id, signal=signal)
        except (errdefs.FailedPrecondition, errdefs.NotFound, AgentGone) as e:
            raise ProcessGone() from e

    def resize(self, width: int, height: int) -> None:
        if self.pio is not None:
            self.pio.resize(width, height)
        c = self.container
        if self.stdio.terminal and self.pid and c.backend.client is not None and not c.backend.client.closed:
            asyncio.get_running_loop().create_task(
                c.backend.quiet_call("resize", id=c.id, exec_id=self.exec_id, width=width, height=height)
            )

    def close_stdin(self) -> None:
        self._stdin_closed = True
        if self.pio is not None:
            self.pio.close_stdin()

    async def drain(self) -> None:
        pending = [t for t in self._outputs if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=DRAIN_TIMEOUT)
        if self.pio is not None:
            await self.pio.drain()

    async def close(self) -> None:
        for t in self._outputs + self._inputs:
            t.cancel()
        if self._outputs or self._inputs:
            await asyncio.gather(*self._outputs, *self._inputs, return_exceptions=True)
        self._outputs.clear()
        self._inputs.clear()
        _close(self._input_fd)
        self._input_fd = -1
        if self.pio is not None:
            await self.pio.close()


class VMContainer(Container):
    def __init__(self, backend: VMBackend, req: ContainerRequest) -> None:
        self.backend = backend
        self.req = req
        self.id = req.id
        self.init: VMProcess = VMProcess(self, "", req.stdio)
        self.execs: dict[str, VMProcess] = {}
        self._deleted = False
        self._created_in_guest = False

    @property
    def guest_dir(self) -> str:
        return f"{vmimage.GUEST_SHARED}/{self.id}"

    @property
    def shares_pid_namespace(self) -> bool:
        return oci.joins_or_shares_pid_namespace(self.req.spec)

    async def create(self) -> None:
        b = self.backend
        assert b.share is not None
        stdio = self.req.stdio
        owner = b.owner == self.id
        hold = vmspec.hold_args(self.req.spec, not stdio.null or stdio.terminal) if owner else None
        try:
            if hold is not None:
                # The pod's sandbox: the agent holds its namespaces, no pause container runs.
                op, args, wire = "hold", hold, None
            else:
                self._prepare_bundle(b.share)
                wire = await self.init.open_stdio()
                op, args = "create", {"bundle": self.guest_dir, "stdio": wire}
            b.register(self.init)
            resp = await b.call(op, id=self.id, **args)
            self._created_in_guest = True
            self.init.pid = int(resp["pid"])
            if wire is not None:
                self.init.stdio_created(wire)
            b.registered_pid(self.init)
        except BaseException:
            b.unregister(self.init)
            await self.init.close()
            self._remove_bundle()
            raise

    def _prepare_bundle(self, share: PodShare) -> None:
        req = self.req
        rootfs = req.rootfs
        if not rootfs:
            root = str((req.spec.get("root") or {}).get("path") or "rootfs")
            src = root if os.path.isabs(root) else os.path.join(req.bundle, root)
            rootfs = [mounts.Mount("bind", src, ("rbind",))]
        spec, binds = vmspec.guest_spec(req.spec, self.guest_dir)
        share.add(self.id, spec, rootfs, binds)

    def _remove_bundle(self) -> None:
        if self.backend.share is not None:
            self.backend.share.remove(self.id)

    async def new_exec(self, exec_id: str, process_spec: dict[str, Any], stdio: StdioConfig) -> Process:
        p = VMProcess(self, exec_id, stdio)
        p.process_spec = process_spec
        self.execs[exec_id] = p
        return p

    async def kill_all(self, signal: int) -> None:
        with contextlib.suppress(AgentGone):
            await self.backend.call("kill", id=self.id, signal=signal, all=True)

    async def pause(self) -> None:
        await self.backend.call("pause", id=self.id)

    async def resume(self) -> None:
        await self.backend.call("resume", id=self.id)

    async def update(self, resources_json: bytes) -> None:
        await self.backend.call("update", id=self.id, resources=json.loads(resources_json or b"{}"))

    async def pids(self) -> list[int]:
        resp = await self.backend.call("pids", id=self.id)
        return [int(p) for p in resp.get("pids") or []]

    async def stats(self) -> tuple[str, bytes]:
        from google.protobuf import json_format

        from podshim.api import cgroups_v2_pb2

        try:
            resp = await self.backend.call("stats", id=self.id)
        except AgentGone as e:
            raise errdefs.NotFound(f"the pod VM is gone: {e}") from e
        metrics = resp["metrics"]
        if self.id == self.backend.owner:
            _add_vm_usage(metrics, self.backend)
        return V2_METRICS_URL, json_format.ParseDict(
            metrics, cgroups_v2_pb2.Metrics(), ignore_unknown_fields=True
        ).SerializeToString()

    async def delete(self) -> None:
        if self._deleted:
            return
        b = self.backend
        if self._created_in_guest and b.usable:
            with contextlib.suppress(AgentGone):
                await b.call("delete", id=self.id)
        self._deleted = True
        for p in [self.init, *self.execs.values()]:
            b.unregister(p)
            await p.close()
        self._remove_bundle()
        await b.container_deleted(self)


def _add_vm_usage(metrics: dict[str, Any], backend: VMBackend) -> None:
    """The owner task (the sandbox) reports what the VM itself costs the node, as hcsshim's owner
    task does: qemu's CPU time and resident memory, with the VM's size as the limit.  They go in
    the cgroup Metrics containerd knows how to decode (any other type breaks CRI's stats)."""
    vm = backend.vm
    if vm is None or not vm.alive:
        return
    try:
        with open(f"/proc/{vm.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    usec = ticks * 1_000_000 // os.sysconf("SC_CLK_TCK")
    cpu = metrics.setdefault("cpu", {})
    cpu["usage_usec"] = usec
    cpu["user_usec"] = int(fields[11]) * 1_000_000 // os.sysconf("SC_CLK_TCK")
    cpu["system_usec"] = int(fields[12]) * 1_000_000 // os.sysconf("SC_CLK_TCK")
    memory = metrics.setdefault("memory", {})
    memory["usage"] = vm.memory()["rss"]
    memory["usage_limit"] = backend.params.memory_mib * 1024 * 1024


class VMBackend(Backend):
    name = "vm"
    # Stats decoding, the pod network (only VM pods pay for pyroute2).
    lazy_modules = ("google.protobuf.json_format", "podshim.api.cgroups_v2_pb2", "pyroute2")
    sandbox_owns_workloads = True

    def __init__(
        self,
        params: vmspec.VMParams,
        pod_id: str,
        on_oom: Callable[[str], None],
        run_root: str = "",
    ) -> None:
        self.params = params
        self.pod_id = pod_id
        self.on_oom = on_oom
        self.run_root = run_root or qemu.run_root()
        self.vm: qemu.QemuVM | None = None
        self.share: PodShare | None = None
        self.client: AgentClient | None = None
        self.containers: dict[str, VMContainer] = {}
        self.owner = ""
        self.boot_seconds = 0.0
        # time.monotonic() at qemu's spawn, its agent socket, the agent's answer (Diag's boot phases)
        self.boot_marks: dict[str, float] = {}
        self.boot_mode = ""
        self.hostname = ""
        self.timings: dict[str, float] = {}
        self._booting = False
        self._redirected = False
        self._procs: dict[tuple[str, str], VMProcess] = {}
        self._early_exits: dict[tuple[str, str], int] = {}
        self._boot_lock = asyncio.Lock()
        self.net: network.PodNetwork | None = None
        self._gone = ""
        self._closing = False

    @property
    def usable(self) -> bool:
        return not self._gone and self.client is not None and not self.client.closed

    # -- the VM ---------------------------------------------------------------------------------

    async def _boot(self, owner: ContainerRequest) -> None:
        """Start the pod's VM: a clone of the shape's template when there is one (built now if
        need be), a cold boot otherwise or when restoring fails, with the reason logged."""
        self._booting = True
        try:
            await self._boot_vm(owner)
        finally:
            self._booting = False

    async def _boot_vm(self, owner: ContainerRequest) -> None:
        netns = network.pod_netns(owner.spec)
        if netns:
            try:
                self.net = await asyncio.to_thread(network.read_pod_network, netns)
            except network.NetworkError as e:
                raise errdefs.ShimError(f"cannot read the pod's network: {e}") from e
        shape = vmtemplate.Shape(
            memory_mib=self.params.memory_mib,
            vcpus=self.params.vcpus,
            kernel=self.params.kernel,
            initrd=self.params.initrd,
            faults=os.environ.get(FAULTS_ENV) == "1",
            tb_size_mib=self.params.tb_size_mib,
        )
        self.hostname = str(owner.spec.get("hostname") or "") or self.pod_id[:63]
        t0 = time.monotonic()
        template: vmtemplate.Template | None = None
        if not self.params.template:
            self.boot_mode = "cold (vm.template = false)"
        else:
            try:
                template = await vmtemplate.ensure(shape)
            except (vmtemplate.TemplateUnavailable, OSError) as e:
                self.boot_mode = f"cold (no template: {e})"
                log.warning("pod VM %s boots cold: no template: %s", self.pod_id, e)
        self.timings = {"template_wait": time.monotonic() - t0}
        if template is not None:
            try:
                await self._start(shape, template)
                self.boot_mode = f"clone of template {template.key}"
            except BaseException as e:
                if self._closing or not isinstance(e, errdefs.ShimError):
                    await self._teardown()
                    raise
                vmtemplate.invalidate(template, str(e))
                log.warning(
                    "pod VM %s boots cold: restoring from template %s failed: %s",
                    self.pod_id,
                    template.key,
                    e,
                )
                self.boot_mode = f"cold (restoring from template {template.key} failed)"
                template = None
        if template is None:
            try:
                await self._start(shape, None)
            except BaseException:
                await self._teardown()
                raise
        self.boot_seconds = time.monotonic() - t0
        log.info(
            "pod VM %s ready in %.2f s, %s (%s); %s",
            self.pod_id,
            self.boot_seconds,
            self.boot_mode,
            self.vm.accel.name if self.vm else "?",
            " ".join(f"{k}={v:.3f}" for k, v in self.timings.items()),
        )
        self._write_timings()

    async def _start(self, shape: vmtemplate.Shape, template: vmtemplate.Template | None) -> None:
        run_dir = qemu.run_dir_for(self.pod_id, self.run_root)
        if os.path.exists(run_dir):
            qemu.remove_run_dir(run_dir)  # a leftover of a shim that was SIGKILLed, or a failed clone
        cfg = shape.config(
            self.pod_id[:32],
            run_dir,
            qemu.Boot.CLONE if template else qemu.Boot.COLD,
            memory_file=template.memory_file if template else "",
            state_file=template.state_file if template else "",
            netns=self.net.netns if self.net else "",
            tap=qemu.Tap(network.TAP_NAME, self.net.mac) if self.net else None,
        )
        vm = qemu.QemuVM(cfg)
        self.vm = vm
        share = PodShare(run_dir)
        self.share = share
        # A clone's restore is cheap; only cold boots (CPU-bound under TCG) take a boot slot.
        slot = qemu.boot_slot(self.run_root)
        deadline = time.monotonic() + BOOT_TIMEOUT
        timings = self.timings
        try:
            if template is None:
                await asyncio.wait_for(slot.acquire(), BOOT_TIMEOUT)
            try:
                t_exec = self.boot_marks["spawn"] = time.monotonic()
                share.open()
                vm.spawn()
                vm.on_exit(lambda status: self._lost(f"qemu exited with status {status}"))
                if self.net is not None:
                    self._redirected = True
                    await asyncio.to_thread(network.redirect, self.net)
                await vm.wait_socket(deadline)
                self.boot_marks["socket"] = time.monotonic()
                client = AgentClient(cfg.agent_socket, self._event)
                self.client = client
                connect = asyncio.ensure_future(client.connect(max(1.0, deadline - time.monotonic())))
                if template is not None:
                    try:
                        await vm.restore(deadline)
                    except BaseException:
                        connect.cancel()
                        with contextlib.suppress(BaseException):
                            await connect
                        raise
                    self.boot_marks["restored"] = time.monotonic()
                    timings["restored"] = self.boot_marks["restored"] - t_exec
                died = asyncio.ensure_future(self._vm_exit())
                done, _ = await asyncio.wait({connect, died}, return_when=asyncio.FIRST_COMPLETED)
                died.cancel()
                if connect not in done:
                    connect.cancel()
                    with contextlib.suppress(BaseException):
                        await connect
                    raise qemu.VMError(f"the pod VM died while booting: {vm.console_tail()}")
                await connect
                self.boot_marks["ready"] = time.monotonic()
                timings["agent_ready"] = self.boot_marks["ready"] - t_exec
                self.attach(client)
                await client.call("setup", **self._setup_args())
                self.boot_marks["setup"] = time.monotonic()
                timings["setup_done"] = self.boot_marks["setup"] - t_exec
            finally:
                slot.release()
        except BaseException as e:
            await self._stop_vm()
            if isinstance(e, errdefs.ShimError):
                raise
            if isinstance(e, qemu.VMError | network.NetworkError | OSError | TimeoutError):
                raise errdefs.ShimError(f"cannot start the pod VM: {e}") from e
            raise

    def _setup_args(self) -> dict[str, Any]:
        """What makes this VM the pod's (the agent's ``setup``): fresh entropy first of all, as
        every clone of a template resumes with the template's random state."""
        net = self.net
        return {
            "entropy": base64.b64encode(os.urandom(SETUP_ENTROPY_BYTES)).decode(),
            "time_ns": time.time_ns(),
            "mac": net.mac if net else _random_mac(),
            "hostname": self.hostname,
            "network": network.guest_network(net) if net else {},
        }

    def _write_timings(self) -> None:
        """For the bench's breakdown: where this VM's start went (in its run dir, gone with it)."""
        if self.vm is None:
            return
        with contextlib.suppress(OSError), open(os.path.join(self.vm.cfg.run_dir, "timings.json"), "w") as f:
            json.dump({"mode": self.boot_mode, **self.timings}, f)

    def attach(self, client: AgentClient) -> None:
        """Serve the pod through ``client``, a connected session; its loss is the VM's death."""
        self.client = client
        client.on_close(lambda: self._lost(client.close_reason))

    async def _vm_exit(self) -> None:
        while self.vm is not None and self.vm.alive:
            await asyncio.sleep(0.05)

    def _lost(self, why: str) -> None:
        """The VM or its agent is gone: force-exit what ran in it, then clean up.  While it boots,
        the boot itself sees the death and fails (or falls back to a cold boot)."""
        if self._closing or self._gone or self._booting:
            return
        self._gone = why
        live = [p for p in self._procs.values() if p.status is None and p.pid]
        log.warning("pod VM %s lost (%s): force-exiting %d process(es)", self.pod_id, why, len(live))
        for p in live:
            p.exited(FORCED_EXIT_STATUS)
        asyncio.get_running_loop().create_task(self._teardown())

    async def _stop_vm(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.close()
        vm = self.vm
        if vm is not None:
            for c in list(self.containers.values()):
                c._remove_bundle()
        if self.share is not None:
            self.share.close()  # the mounts this backend made, before the run dir goes
        if vm is not None:
            await vm.close()
        if self.net is not None and self._redirected:
            self._redirected = False
            await asyncio.to_thread(network.unredirect, self.net)

    async def _teardown(self) -> None:
        await self._stop_vm()
        self.net = None

    # -- agent plumbing ---------------------------------------------------------------------------

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        if self._gone:
            raise AgentGone(f"the pod VM is gone ({self._gone})")
        if self.client is None:
            raise AgentGone("the pod VM is not running")
        return await self.client.call(op, **args)

    async def quiet_call(self, op: str, **args: Any) -> None:
        with contextlib.suppress(errdefs.ShimError):
            await self.call(op, **args)

    def register(self, p: VMProcess) -> None:
        self._procs[p.key] = p

    def registered_pid(self, p: VMProcess) -> None:
        status = self._early_exits.pop(p.key, None)
        if status is not None:
            p.exited(status)

    def unregister(self, p: VMProcess) -> None:
        if self._procs.get(p.key) is p:
            del self._procs[p.key]
        self._early_exits.pop(p.key, None)

    def _event(self, ev: dict[str, Any]) -> None:
        """An event from the guest, which may lie: only ids this backend registered are believed
        (an OOM for another pod's container id would reach CRI as that container's OOM), and what
        is kept for later is bounded by what was registered.  A malformed event is a protocol
        violation (ProtocolError), which ends the channel."""
        kind = ev.get("event")
        cid = ev.get("id")
        if not isinstance(cid, str):
            raise ProtocolError(f"{kind} event without a container id")
        if kind == "exit":
            eid, status = ev.get("exec_id") or "", ev.get("status")
            if not isinstance(eid, str) or not isinstance(status, int) or isinstance(status, bool):
                raise ProtocolError(f"malformed exit event for {cid}")
            p = self._procs.get((cid, eid))
            if p is None:
                return  # not ours, or already deleted
            if p.pid:
                p.exited(status)
            else:
                # An exec that exits before its exec call has returned.
                self._early_exits[p.key] = status
        elif kind == "oom":
            if cid in self.containers:
                self.on_oom(cid)
        else:
            raise ProtocolError(f"unknown event {kind!r}")

    # -- Backend ---------------------------------------------------------------------------------

    async def create_container(self, req: ContainerRequest) -> Container:
        async with self._boot_lock:
            if self.vm is None:
                await self._boot(req)
                self.owner = req.id
        if self._gone:
            raise errdefs.FailedPrecondition(f"the pod VM is gone ({self._gone})")
        if req.id in self.containers:
            raise errdefs.AlreadyExists(f"container {req.id} already exists in the pod VM")
        c = VMContainer(self, req)
        self.containers[req.id] = c
        try:
            await c.create()
        except BaseException:
            self.containers.pop(req.id, None)
            if req.id == self.owner and not self.containers:
                await self.close()
            raise
        return c

    async def container_deleted(self, c: VMContainer) -> None:
        self.containers.pop(c.id, None)
        if self.owner not in self.containers and not self.containers:
            # The VM belongs to its first container (the sandbox): gone with it.
            await self.close()

    def memory(self) -> dict[str, int]:
        return self.vm.memory() if self.vm is not None else {"rss": 0, "pss": 0}

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        await self._teardown()
