"""Diag for VM pods, on the host: the guest agent's stacks, a command in the guest, a host path
shared into the guest, and the VM's own figures (boot phases, agent latency, qemu's cost).

The guest's side is :mod:`podshim.guest.diag`.  Shares are bind mounts in the pod share's stage
(``.diag/<n>``, :meth:`PodShare.add_path`: no path the guest can change is walked), so they go
with the share; a read-only share is read-only on the host side of 9p, which a hostile guest
cannot undo.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import posixpath
import re
import socket
from typing import TYPE_CHECKING

from podshim import errdefs
from podshim.api import diag_pb2 as D
from podshim.shim.figures import add_histogram, proc_cpu_seconds
from podshim.shim.logfmt import printable
from podshim.vm import image as vmimage

if TYPE_CHECKING:
    from podshim.backends.vm.backend import VMBackend
    from podshim.shim.telemetry import Telemetry

EXEC_WAIT_TIMEOUT = 7 * 24 * 3600.0  # an interactive shell may stay open for long
OUTPUT_DRAIN_TIMEOUT = 5.0
# Guest paths a share may not cover: the agent's own mounts and the guest's userland.
RESERVED_GUEST_PATHS = ("/run/podshim", "/usr", "/proc", "/sys", "/dev", "/bb", "/init")
_AGENT_LINE = re.compile(r"podshim-init: agent (\d+(?:\.\d+)?)")
_share_ids = itertools.count(1)


def _client(vm: VMBackend) -> None:
    if not vm.usable:
        raise errdefs.FailedPrecondition("the pod VM is not running")


async def guest_stacks(vm: VMBackend) -> str:
    _client(vm)
    resp = await vm.call("diag_stacks", timeout=30.0)
    return printable(str(resp.get("stacks") or ""))  # the guest may be hostile: no terminal escapes


async def guest_exec(
    vm: VMBackend,
    argv: list[str],
    env: dict[str, str],
    tty: bool,
    conns: dict[int, socket.socket],
    width: int,
    height: int,
) -> int:
    """Start the command in the guest with its stdio as channel streams, feed stdin once the
    agent holds the streams, then wait for its exit and the end of its output."""
    _client(vm)
    client = vm.client
    assert client is not None
    stdio: dict[str, object] = {"terminal": tty}
    outputs: list[asyncio.Task[None]] = []
    for stream, key in ((1, "stdout"), (2, "stderr")):
        if stream in conns:
            sid = client.new_stream()
            stdio[key] = sid
            outputs.append(client.attach_output(sid, conns.pop(stream).detach()))
    if 0 in conns:
        stdio["stdin"] = client.new_stream()
    try:
        resp = await vm.call("diag_exec", args=argv, env=env, stdio=stdio, width=width, height=height)
        if 0 in conns:
            client.attach_input(int(str(stdio["stdin"])), conns.pop(0).detach())
        done = await vm.call("diag_wait", pid=int(resp["pid"]), timeout=EXEC_WAIT_TIMEOUT)
        if outputs:
            await asyncio.wait(outputs, timeout=OUTPUT_DRAIN_TIMEOUT)
        return int(done.get("exit_code") or 0)
    finally:
        for t in outputs:
            t.cancel()


def _guest_target(path: str) -> str:
    if not path.startswith("/") or "\0" in path:
        raise errdefs.InvalidArgument(f"guest path {path!r} must be absolute")
    norm = posixpath.normpath(path)
    if norm != path.rstrip("/") or norm == "/":
        raise errdefs.InvalidArgument(f"guest path {path!r} must be a normalised path below /")
    for reserved in RESERVED_GUEST_PATHS:
        if norm == reserved or norm.startswith(reserved + "/"):
            raise errdefs.InvalidArgument(f"guest path {path!r} is reserved (under {reserved})")
    return norm


async def share(vm: VMBackend, host_path: str, guest_path: str, writable: bool) -> None:
    _client(vm)
    target_in_guest = _guest_target(guest_path)
    if not os.path.isabs(host_path):
        raise errdefs.InvalidArgument(f"host path {host_path!r} must be absolute")
    if not os.path.exists(host_path):
        raise errdefs.NotFound(f"host path {host_path} does not exist")
    assert vm.share is not None
    name = str(next(_share_ids))
    try:
        rel = vm.share.add_path(name, host_path, writable)
    except OSError as e:
        raise errdefs.ShimError(f"cannot share {host_path} with the VM: {e}") from e
    await vm.call(
        "diag_share",
        source=f"{vmimage.GUEST_SHARED}/{rel}",
        target=target_in_guest,
        directory=os.path.isdir(host_path),
        writable=writable,
    )


# -- figures ------------------------------------------------------------------------------------


def qemu_usage(vm: VMBackend) -> tuple[int, int, float]:
    """qemu's RSS, PSS (bytes) and CPU seconds; zeros once it is gone."""
    q = vm.vm
    if q is None or not q.alive:
        return 0, 0, 0.0
    mem = q.memory()
    return mem["rss"], mem["pss"], proc_cpu_seconds(q.pid)


def boot_phases(vm: VMBackend) -> dict[str, float]:
    """qemu (spawn to its chardev socket); then, for a cold boot, kernel (guest uptime when the
    init execs the agent, from the console) and agent (the rest, up to the agent's HELLO
    answer), or, for a clone of a template, restore (the migration stream in) and agent (to its
    answer); then setup (the agent made the VM the pod's: entropy, clock, network, share)."""
    marks = vm.boot_marks
    if "ready" not in marks or "socket" not in marks:
        return {}
    phases = {"qemu": marks["socket"] - marks["spawn"]}
    if "restored" in marks:
        phases["restore"] = marks["restored"] - marks["socket"]
        phases["agent"] = marks["ready"] - marks["restored"]
    else:
        rest = marks["ready"] - marks["socket"]
        if "kernel" not in marks and vm.vm is not None:
            # The first such line is the init's, written before anything else in the guest
            # runs; read once, before the console log can rotate it away.
            with contextlib.suppress(OSError), open(vm.vm.cfg.console_log, errors="replace") as f:
                m = _AGENT_LINE.search(f.read(256 * 1024))
                if m:
                    marks["kernel"] = min(float(m.group(1)), rest)
        kernel = marks.get("kernel", 0.0)
        phases["kernel"] = kernel
        phases["agent"] = rest - kernel
    if "setup" in marks:
        phases["setup"] = marks["setup"] - marks["ready"]
    return phases


def families(vm: VMBackend, t: Telemetry) -> list[D.MetricFamily]:
    out: list[D.MetricFamily] = []
    f = D.MetricFamily(name="podshim_vm_boot_phase_seconds", type="gauge",
                       help="a VM pod's start: qemu exec, kernel or restore, agent, setup")  # fmt: skip
    for phase, seconds in boot_phases(vm).items():
        f.samples.add(labels={"phase": phase}, value=seconds)
    out.append(f)
    f = D.MetricFamily(name="podshim_vm_agent_request_duration_seconds", type="histogram",
                       help="guest agent requests, by operation")  # fmt: skip
    for op, h in sorted(t.agent_latency.items()):
        add_histogram(f, h, {"op": op})
    out.append(f)
    rss, pss, cpu = qemu_usage(vm)
    f = D.MetricFamily(name="podshim_vm_memory_bytes", type="gauge", help="qemu's rss and pss")
    f.samples.add(labels={"kind": "rss"}, value=rss)
    f.samples.add(labels={"kind": "pss"}, value=pss)
    out.append(f)
    f = D.MetricFamily(name="podshim_vm_cpu_seconds_total", type="counter", help="qemu's CPU time")
    f.samples.add(value=cpu)
    out.append(f)
    return out
