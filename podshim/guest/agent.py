"""podshim's guest agent: PID 1 of a pod VM, running containers with runc for the shim.

Runs on the guest's ``/usr/bin/python3`` (the host's, over 9p) with the standard library only,
started by the initramfs's ``/init`` as ``python3 -m podshim.guest.agent``.  It speaks
:mod:`podshim.guest.protocol` over a virtio-serial port and:

* creates, starts, execs, kills, pauses, resumes, updates and deletes containers with
  ``runc --root /run/runc``, from bundles the shim put in the pod share;
* carries each process's stdio as DATA streams (pipes, or the pty runc hands back);
* reports exits and OOM kills as events, and answers stats from the guest's cgroup v2;
* keeps serving when the shim disconnects and reconnects: the port is a byte pipe that outlives
  host connections, so each new session starts with a HELLO carrying a snapshot of every process.

Threads, not asyncio: ``import asyncio`` pulls in ssl and friends, which under TCG over 9p costs
a noticeable part of boot, and everything here is a handful of blocking loops.  The mechanisms
(reaper, runc's command line, cgroup readers, OOM watch, stdio pumps) are the shim's own
``podshim.system`` modules, driven here from threads; the modules of this package split the
rest by concern (:mod:`.channel`, :mod:`.stdio`, :mod:`.containers`, :mod:`.reaper`,
:mod:`.runc`); this one holds the session and the operations.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

from podshim.guest import holder, libc, netlink
from podshim.guest import runc as runtime
from podshim.guest.channel import Channel, find_port
from podshim.guest.containers import Container, Proc, vm_stats
from podshim.guest.diag import DiagOps
from podshim.guest.errors import AgentError, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from podshim.guest.log import log
from podshim.guest.paths import RUNC_ROOT, SHARE_DIR, SHARE_OPTIONS, SHARE_TAG, STATE
from podshim.guest.reaper import REAPER
from podshim.guest.runc import RuncError, runc, seal_runtime
from podshim.guest.session import Session
from podshim.guest.stdio import Stdio
from podshim.system import runc_command as cmd
from podshim.system.cgroupfs import v2_metrics
from podshim.system.fds import read_text

# <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07)
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
MIN_ENTROPY_BYTES = 32
# Before setup only these: a VM restored from a template shares its random state with every
# other clone until the host's entropy is in.
BEFORE_SETUP = frozenset(("ping", "setup", "state", "vm_stats"))
HOLDER_EXIT_TIMEOUT = 10.0
GUEST_INTERFACE = "eth0"


class Agent(Session, DiagOps):
    """The operations on containers in the VM (and, from :class:`DiagOps`, Diag's guest side)."""

    reaper = REAPER
    invalid_argument = InvalidArgument
    not_found = NotFound
    failure = AgentError

    def __init__(self, chan: Channel) -> None:
        super().__init__(chan)
        self.containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        self.faults = "podshim.faults=1" in read_text("/proc/cmdline")
        self.set_up = False
        self._setup_lock = threading.Lock()
        self.spare: holder.Spare | None = None

    def admit(self, op: str) -> None:
        if not self.set_up and op not in BEFORE_SETUP:
            raise FailedPrecondition(f"{op} before the VM was set up for its pod")

    def snapshot(self) -> list[dict[str, Any]]:
        return [p.snapshot() for c in self.containers.values() for p in c.processes() if p.pid]

    def _container(self, cid: str) -> Container:
        with self._lock:
            c = self.containers.get(cid)
        if c is None:
            raise NotFound(f"container {cid} not found in the VM")
        return c

    def _proc(self, req: dict[str, Any]) -> Proc:
        c = self._container(str(req["id"]))
        eid = str(req.get("exec_id") or "")
        p = c.execs.get(eid) if eid else c.init
        if p is None:
            raise NotFound(f"process {eid or c.id} not found in the VM")
        return p

    # -- operations ---------------------------------------------------------------------------

    def op_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid()}

    def _reserve(self, cid: str) -> None:
        """Claim ``cid`` for a container being made (AlreadyExists if taken); :meth:`_admit` or
        :meth:`_release_id` ends the claim."""
        with self._lock:
            if cid in self.containers or cid in self._creating:
                raise AlreadyExists(f"container {cid} already exists in the VM")
            self._creating.add(cid)

    def _release_id(self, cid: str) -> None:
        with self._lock:
            self._creating.discard(cid)

    def _admit(self, c: Container) -> dict[str, Any]:
        c.watch_oom()
        with self._lock:
            self._creating.discard(c.id)
            self.containers[c.id] = c
        assert c.init is not None
        return {"pid": c.init.pid}

    def op_create(self, req: dict[str, Any]) -> dict[str, Any]:
        cid, bundle = str(req["id"]), str(req["bundle"])
        self._reserve(cid)
        c = Container(self, cid, bundle)
        stdio = Stdio(self, req.get("stdio") or {}, cid)
        pid_file = os.path.join(STATE, f"{cid}.pid")
        try:
            console = stdio.console_path or None
            with REAPER.expecting():  # the init may exit before its pid is read
                runc(cid, *cmd.create_args(cid, bundle, pid_file, console_socket=console), fds=stdio.child)
                if stdio.terminal:
                    stdio.receive_console()
                c.init = Proc(c, "", stdio)
                c.init.claim(cmd.read_pid_file(pid_file))
            stdio.started()
        except BaseException:
            stdio.close()
            with contextlib.suppress(AgentError):
                runc(cid, *cmd.delete_args(cid, force=True))
            self._release_id(cid)
            raise
        c.find_cgroup()
        return self._admit(c)

    def op_hold(self, req: dict[str, Any]) -> dict[str, Any]:
        """Create the pod's sandbox as namespaces held by the agent (:mod:`.holder`), not as a
        container: what the pause container's create and start would do, without the runtime."""
        cid = str(req["id"])
        spec = holder.parse(req)
        cgroups_path = str(req.get("cgroups_path") or f"/podshim/{cid}")
        self._reserve(cid)
        c = Container(self, cid, "", held=True)
        try:
            spare, self.spare = self.spare, None
            if spare is None or not spare.alive:
                spare = holder.Spare.start()
            c.init = Proc(c, "", Stdio(self, {}, cid))
            c.init.pid = spare.pid
            spare.hold(spec, c.init.exited)
            c.place_in_cgroup(cgroups_path)
        except BaseException:
            if c.init is not None and c.init.pid:
                with contextlib.suppress(OSError):
                    os.kill(c.init.pid, signal.SIGKILL)
                c.init.done.wait(HOLDER_EXIT_TIMEOUT)
                c.remove_cgroup()
            self._release_id(cid)
            raise
        return self._admit(c)

    def op_start(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(str(req["id"]))
        if not c.held:  # a holder runs from its creation: nothing waits for a start
            runtime.start(c.id)
        assert c.init is not None
        return {"pid": c.init.pid}

    def op_exec(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(str(req["id"]))
        eid = str(req["exec_id"])
        if c.held:
            raise FailedPrecondition(f"{c.id} is the pod VM's sandbox, held by the agent: nothing runs in it")
        if eid in c.execs:
            raise AlreadyExists(f"exec {eid} already exists in {c.id}")
        name = f"{c.id}.{eid}"
        spec_path = os.path.join(STATE, f"{name}.process.json")
        pid_file = os.path.join(STATE, f"{name}.pid")
        with open(spec_path, "w") as f:
            json.dump(req["process"], f)
        stdio = Stdio(self, req.get("stdio") or {}, name)
        proc = Proc(c, eid, stdio)
        c.execs[eid] = proc
        try:
            console = stdio.console_path or None
            with REAPER.expecting():
                runc(c.id, *cmd.exec_args(c.id, spec_path, pid_file, console_socket=console), fds=stdio.child)
                if stdio.terminal:
                    stdio.receive_console()
                proc.claim(cmd.read_pid_file(pid_file))
            stdio.started()
        except BaseException:
            stdio.close()
            c.execs.pop(eid, None)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(spec_path)
            with contextlib.suppress(OSError):
                os.unlink(pid_file)
        return {"pid": proc.pid}

    def op_kill(self, req: dict[str, Any]) -> dict[str, Any]:
        # Signal 0 probes a process and must stay 0: never "no signal given, so SIGKILL".
        sig = int(req["signal"]) if req.get("signal") is not None else int(signal.SIGKILL)
        if req.get("all"):
            c = self._container(str(req["id"]))
            if c.held:
                self._signal_holder(c, sig, all=True)
                return {}
            try:
                runc(c.id, *cmd.kill_args(c.id, sig, all=True))
            except RuncError as e:
                if not cmd.is_gone(str(e)):
                    raise
            return {}
        p = self._proc(req)
        if p.status is not None or not p.pid:
            raise FailedPrecondition("process already finished")
        if p.container.held:
            self._signal_holder(p.container, sig)
            return {}
        if p.exec_id:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                raise FailedPrecondition("process already finished") from None
            return {}
        try:
            runc(p.container.id, *cmd.kill_args(p.container.id, sig))
        except RuncError as e:
            if p.status is not None or cmd.is_gone(str(e)):
                raise FailedPrecondition("process already finished") from e
            raise
        return {}

    def _signal_holder(self, c: Container, sig: int, all: bool = False) -> None:
        try:
            pid = c.held_pid()
            os.kill(pid, sig)
        except (FailedPrecondition, ProcessLookupError):
            if not all:
                raise FailedPrecondition("process already finished") from None

    def _delete_held(self, c: Container) -> None:
        with contextlib.suppress(FailedPrecondition):
            self._signal_holder(c, signal.SIGKILL)
        assert c.init is not None
        if not c.init.done.wait(HOLDER_EXIT_TIMEOUT):
            raise AgentError(f"the holder of {c.id} did not exit")
        c.remove_cgroup()

    def op_delete(self, req: dict[str, Any]) -> dict[str, Any]:
        """Delete a container, or forget one exec of it."""
        cid = str(req["id"])
        eid = str(req.get("exec_id") or "")
        try:
            c = self._container(cid)
        except NotFound:
            return {}
        if eid:
            p = c.execs.pop(eid, None)
            if p is not None:
                self._release(p)
            return {}
        c.stop_oom()
        if c.held:
            self._delete_held(c)
        else:
            try:
                runc(cid, *cmd.delete_args(cid, force=True))
            except RuncError as e:
                if not cmd.is_missing(str(e)):
                    raise
        for p in c.processes():
            self._release(p)
        with self._lock:
            self.containers.pop(cid, None)
        for name in (f"{cid}.pid", f"{cid}.runc.log"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(STATE, name))
        return {}

    def _release(self, p: Proc) -> None:
        """Close what a deleted process still holds; its stdin writer thread ends too."""
        p.stdio.close()
        with self._lock:
            inp = self._in.get(p.stdio.stdin_sid) if p.stdio.stdin_sid else None
        if inp is not None:
            inp.close()

    def op_pause(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(str(req["id"]))
        if c.held:
            c.freeze(True)
        else:
            runc(c.id, "pause", c.id)
        return {}

    def op_resume(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(str(req["id"]))
        if c.held:
            c.freeze(False)
        else:
            runc(c.id, "resume", c.id)
        return {}

    def op_update(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(str(req["id"]))
        if c.held:
            raise FailedPrecondition(f"{c.id} is the pod VM's sandbox: its resources are the VM's")
        path = os.path.join(STATE, f"{c.id}.resources.json")
        with open(path, "w") as f:
            json.dump(req.get("resources") or {}, f)
        try:
            runc(c.id, *cmd.update_args(c.id, path))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        return {}

    def op_pids(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(str(req["id"]))
        if c.held:
            return {"pids": c.cgroup.pids() if c.cgroup else []}
        return {"pids": cmd.parse_ps(runc(c.id, *cmd.ps_args(c.id), capture=True))}

    def op_stats(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(str(req["id"]))
        if c.cgroup is None or not c.cgroup.v2 or not c.cgroup.exists():
            raise NotFound(f"cgroup of {c.id} does not exist")
        return {"metrics": v2_metrics(c.cgroup), "vm": vm_stats()}

    def op_vm_stats(self, req: dict[str, Any]) -> dict[str, Any]:
        return vm_stats()

    def op_resize(self, req: dict[str, Any]) -> dict[str, Any]:
        self._proc(req).stdio.resize(int(req.get("width") or 0), int(req.get("height") or 0))
        return {}

    def op_close_stdin(self, req: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            inp = self._in.get(int(req["stream"]))
        if inp is not None:
            inp.close()
        return {}

    def op_state(self, req: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            return {"processes": self.snapshot()}

    def op_setup(self, req: dict[str, Any]) -> dict[str, Any]:
        """Make this VM the pod's, after a cold boot or a restore from a template.

        In that order: host entropy into the kernel's pool and a reseed of its generator, before
        anything can draw from it (every clone of a template resumes with the same pool); the
        clock (a clone's is the template's); the MAC (a clone keeps the template's whatever qemu
        was told); hostname, addresses and routes; then the pod share, which could not be mounted
        while the template was saved."""
        with self._setup_lock:
            if self.set_up:
                raise FailedPrecondition("the VM is already set up")
            t0 = time.monotonic()
            mix_entropy(base64.b64decode(str(req.get("entropy") or "")))
            if req.get("time_ns"):
                time.clock_settime_ns(time.CLOCK_REALTIME, int(req["time_ns"]))
            if "random" in sys.modules:
                sys.modules["random"].seed()
            if req.get("hostname"):
                socket.sethostname(str(req["hostname"]))
            # In this process: under TCG a process per `ip` or `mount` cost 30 ms apiece.
            t1 = time.monotonic()
            try:
                messages = _network_messages(req)
                if messages:
                    netlink.apply(messages)
                if req.get("share", True):
                    libc.mount(SHARE_TAG, SHARE_DIR, "9p", 0, SHARE_OPTIONS)
            except OSError as e:
                raise AgentError(f"setting the VM up for its pod failed: {e}") from e
            self.set_up = True
            log(f"set up for the pod in {time.monotonic() - t0:.3f} s ({t1 - t0:.3f} s before the network)")
            return {"uptime": float(read_text("/proc/uptime").split()[0] or 0)}

    def op_shutdown(self, req: dict[str, Any]) -> dict[str, Any]:
        threading.Thread(target=_poweroff, daemon=True).start()
        return {}

    def op_crash(self, req: dict[str, Any]) -> dict[str, Any]:
        """Fault injection for the tests (only with podshim.faults=1 on the kernel command line):
        the agent dies as a crash would, so the kernel panics and the VM goes away."""
        if not self.faults:
            raise FailedPrecondition("fault injection is off in this VM")
        log("crashing on request")
        os._exit(70)


def mix_entropy(data: bytes) -> None:
    """Credit the host's random bytes to the kernel's pool, then reseed its generator at once, so
    that what a clone draws next never depends on when the kernel would reseed by itself."""
    if len(data) < MIN_ENTROPY_BYTES:
        raise InvalidArgument(f"setup needs at least {MIN_ENTROPY_BYTES} bytes of host entropy")
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def _network_messages(req: dict[str, Any]) -> list[tuple[str, bytes]]:
    """``setup``'s MAC and ``network`` (from the host's :func:`podshim.vm.network.guest_network`)
    as rtnetlink requests for eth0; without a network the link only gets its MAC, and stays down."""
    mac = str(req.get("mac") or "")
    net = req.get("network") or {}
    if not mac and not net:
        return []
    try:
        addresses = [netlink.Address(str(a), int(n)) for a, n in net.get("addresses") or []]
        routes = [netlink.Route(str(d), int(n), str(g), int(v)) for d, n, g, v in net.get("routes") or []]
        mtu = int(net.get("mtu") or 0)
        index = socket.if_nametoindex(GUEST_INTERFACE)
    except (TypeError, ValueError, AttributeError) as e:
        raise InvalidArgument(f"setup: malformed network {net!r}: {e}") from e
    except OSError as e:
        raise AgentError(f"the VM has no {GUEST_INTERFACE}: {e}") from e
    return netlink.setup_messages(index, mac=mac, mtu=mtu, addresses=addresses, routes=routes, up=bool(net))


def _poweroff() -> None:
    time.sleep(0.05)  # let the response reach the host
    os.sync()
    os.execv("/bb/poweroff", ["poweroff", "-f"])


def main() -> None:
    os.makedirs(STATE, exist_ok=True)
    os.makedirs(RUNC_ROOT, exist_ok=True)
    REAPER.start()
    seal_runtime()
    holder.prepare()
    port = find_port()
    fd = os.open(port, os.O_RDWR | os.O_CLOEXEC)
    log(f"serving on {port}")
    agent = Agent(Channel(fd))
    agent.spare = holder.Spare.start()  # before a template is saved: its clones find it ready
    agent.serve()


if __name__ == "__main__":
    main()
