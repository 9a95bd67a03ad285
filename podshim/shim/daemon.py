"""The long-running shim server: a subreaper serving the Task API on its socket (spec §1.4)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable

from podshim import options
from podshim.service import SERVICE, TaskService
from podshim.shim import address, logfmt, loopcheck
from podshim.shim.publisher import EventPublisher
from podshim.shim.telemetry import TELEMETRY
from podshim.system import reaper
from podshim.ttrpc.server import Method, Server

log = logging.getLogger("podshim")

DIAG_SERVICE = "podshim.diag.v1.Diag"
# Fault injection for the tests: with this set in the shim's environment, SIGUSR2 makes the server
# die of an unhandled exception (panic.log, and the delete action's copy of it).
FAULTS_ENV = "PODSHIM_SHIM_FAULT_INJECTION"


class InjectedPanic(Exception):
    pass


def setup_logging(bundle: str, debug: bool, pod: str = "") -> None:
    """Log to the bundle's ``log`` FIFO, which containerd copies into its own log."""
    try:
        fd = os.open(os.path.join(bundle, "log"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        fd = -1
    if fd >= 0:
        os.dup2(fd, 2)
        os.close(fd)
    # A full FIFO must never block the shim; a dropped log line is the lesser harm.
    logging.raiseExceptions = False
    logfmt.install(2, pod, debug)


def _stack_dumper(service: TaskService) -> Callable[[], None]:
    """SIGUSR1: the shim's stacks into its log now, and a VM guest agent's once it answers."""
    pending: set[asyncio.Task[None]] = set()

    async def guest(backend: object) -> None:
        from podshim.backends.vm import diag as vmdiag
        from podshim.errdefs import ShimError

        try:
            text = await vmdiag.guest_stacks(backend)  # type: ignore[arg-type]
        except ShimError as e:
            text = f"(the guest agent did not answer: {e})"
        log.info("=== guest agent stacks (SIGUSR1) ===\n%s=== end of guest agent stacks ===", text)

    def dump() -> None:
        from podshim.shim import stacks  # loaded when first asked for

        log.info("=== stacks (SIGUSR1) ===\n%s=== end of stacks ===", stacks.dump())
        host = service.host
        if host is not None and host.backend.name == "vm":
            task = asyncio.get_running_loop().create_task(guest(host.backend))
            pending.add(task)
            task.add_done_callback(pending.discard)

    return dump


async def serve(
    sock: socket.socket,
    *,
    namespace: str,
    socket_path: str,
    start_options: options.ShimOptions,
    bundle: str = "",
) -> int:
    loop = asyncio.get_running_loop()
    loopcheck.install_from_env(loop)
    reaper.become_subreaper()
    reaper.REAPER.install(loop)
    done = asyncio.Event()
    ttrpc_address = os.environ.get("TTRPC_ADDRESS", "")
    publisher = EventPublisher(ttrpc_address.removeprefix("unix://"), namespace)
    service = TaskService(
        namespace=namespace, events=publisher, start_options=start_options, on_shutdown=done.set
    )

    def diag_methods() -> dict[str, Method]:
        from podshim.shim.diag import DiagService

        return DiagService(
            service, namespace=namespace, containerd_address=ttrpc_address, socket=socket_path, bundle=bundle
        ).methods()

    server = Server({SERVICE: service.methods(), DIAG_SERVICE: diag_methods}, observer=TELEMETRY.request_done)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    loop.add_signal_handler(signal.SIGUSR1, _stack_dumper(service))
    panic: list[str] = []
    if os.environ.get(FAULTS_ENV) == "1":

        def inject() -> None:
            panic.append("fault injection: SIGUSR2")
            done.set()

        loop.add_signal_handler(signal.SIGUSR2, inject)
    sock.setblocking(False)
    serving = loop.create_task(server.serve(sock))
    await done.wait()
    if panic:
        raise InjectedPanic(panic[0])
    log.info("shutting down")
    # Let the Shutdown reply reach containerd before the connection goes.
    await server.close(grace=1.0)
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    address.remove_own(socket_path)
    await publisher.close(timeout=5.0)
    await service.close()
    reaper.REAPER.uninstall()
    return 0
