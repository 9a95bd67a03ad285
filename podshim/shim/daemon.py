"""The long-running shim server: a subreaper serving the Task API on its socket (spec §1.4)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

from podshim import options
from podshim.service import SERVICE, TaskService
from podshim.shim import address, loopcheck
from podshim.shim.publisher import EventPublisher
from podshim.system import reaper
from podshim.ttrpc.server import Server

log = logging.getLogger("podshim")


def setup_logging(bundle: str, debug: bool) -> None:
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
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if debug else logging.INFO,
        format="time=%(asctime)s level=%(levelname)s msg=%(message)s runtime=io.containerd.podshim.v1",
    )


async def serve(
    sock: socket.socket, *, namespace: str, socket_path: str, start_options: options.ShimOptions
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
    server = Server({SERVICE: service.methods()})
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    sock.setblocking(False)
    serving = loop.create_task(server.serve(sock))
    await done.wait()
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
