"""The `start` action under a burst: many containers of one pod started at once get one shim.

containerd runs `start` once per container, and nothing stops it from running them in parallel
(CRI creates a pod's containers concurrently).  Each must print the address of the same, single
server.  These tests run the shim binary the way containerd does, without containerd: the
server they start is shut down over its own socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

from google.protobuf.empty_pb2 import Empty
from harness.containerd import VENV_BIN
from harness.poll import wait_until

from podshim.api import task_pb2
from podshim.shim.address import LOCK_SUFFIX
from podshim.ttrpc.client import Client
from podshim.ttrpc.status import TtrpcClosed

SHIM = VENV_BIN / "containerd-shim-podshim-v1"
TASK = "containerd.task.v2.Task"
BURST = 50


def _bundle(state: Path, namespace: str, cid: str, pod: str) -> Path:
    bundle = state / "io.containerd.runtime.v2.task" / namespace / cid
    bundle.mkdir(parents=True)
    annotations = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": pod}
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "annotations": annotations}))
    return bundle


def _servers(namespace: str) -> list[int]:
    """Live processes of the shim binary started for ``namespace``: the `start` actions have
    all exited by the time this is asked, so these are servers."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        # The server's argv names the Python entry point (podshim-cold/…), whichever way it started.
        named = any(os.path.basename(a) == SHIM.name.encode() for a in argv[:2])
        if state not in ("Z", "X") and named and namespace.encode() in argv:
            found.append(int(entry))
    return found


async def _shutdown(socket_path: str) -> None:
    client = await Client.connect(socket_path)
    try:
        # As containerd does: a shim that exits before its reply reaches us has shut down.
        with contextlib.suppress(TtrpcClosed):
            await client.call(TASK, "Shutdown", task_pb2.ShutdownRequest(id="any"), Empty)
    finally:
        await client.close()


def test_concurrent_starts_for_one_pod_make_one_shim(tmp_path: Path) -> None:
    state = tmp_path / "state"
    namespace = f"burst-{secrets.token_hex(4)}"
    pod = "pod-" + secrets.token_hex(4)
    bundles = [_bundle(state, namespace, f"c{i}", pod) for i in range(BURST)]
    grpc_address = str(tmp_path / "containerd.sock")
    starts = [
        subprocess.Popen(
            [str(SHIM), "-namespace", namespace, "-address", grpc_address, "-id", b.name, "start"],
            cwd=b,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for b in bundles
    ]
    addresses = set()
    try:
        for p in starts:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode(errors="replace")
            addresses.add(out.decode())
        assert len(addresses) == 1, f"{len(addresses)} different addresses: {sorted(addresses)}"
        (address,) = addresses
        assert {(b / "address").read_text() for b in bundles} == addresses
        servers = _servers(namespace)
        assert len(servers) == 1, f"{len(servers)} shims serve one pod: {servers}"
    finally:
        for p in starts:
            if p.poll() is None:
                p.kill()
                p.wait()
        for path in {a.removeprefix("unix://") for a in addresses}:
            if os.path.exists(path):
                asyncio.run(_shutdown(path))
        wait_until(lambda: not _servers(namespace), 15, "the burst's shims to shut down")
    sock = address.removeprefix("unix://")
    assert not os.path.exists(sock), "the shim left its socket"
    assert not os.path.exists(sock + LOCK_SUFFIX), "the shim left its lock file"


def _start(tmp_path: Path, namespace: str, pod: str, cid: str) -> str:
    b = _bundle(tmp_path / "state", namespace, cid, pod)
    res = subprocess.run(
        [str(SHIM), "-namespace", namespace, "-address", str(tmp_path / "c.sock"), "-id", cid, "start"],
        cwd=b, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    return res.stdout.decode()


def test_start_reuses_a_live_shim_that_cannot_accept(tmp_path: Path) -> None:
    """A live shim that does not accept in time (stopped here; under load in real life) with a
    full backlog: a connect would time out, but the shim is alive and must not be replaced."""
    namespace = f"busy-{secrets.token_hex(4)}"
    pod = "pod-" + secrets.token_hex(4)
    first = _start(tmp_path, namespace, pod, "a")
    sock = first.removeprefix("unix://")
    (server,) = _servers(namespace)
    os.kill(server, signal.SIGSTOP)
    pending: list[socket.socket] = []
    try:
        while True:  # fill the listen backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            pending.append(s)
            try:
                s.connect(sock)
            except BlockingIOError:
                break
        assert _start(tmp_path, namespace, pod, "b") == first
        assert _servers(namespace) == [server], "a second shim was started beside the live one"
        assert os.path.exists(sock), "the live shim's socket was removed"
    finally:
        os.kill(server, signal.SIGCONT)
        for s in pending:
            s.close()
    # Until the shim has drained the backlog, a connect can come back "connected" without being
    # queued (EAGAIN on a unix socket), and the Shutdown goes nowhere: ask until it goes.
    deadline = time.monotonic() + 15
    while _servers(namespace):
        assert time.monotonic() < deadline, "the shim did not shut down"
        with contextlib.suppress(OSError, TtrpcClosed):
            asyncio.run(_shutdown(sock))
        time.sleep(0.1)


def test_start_after_a_killed_shim_makes_a_new_one(tmp_path: Path) -> None:
    """The lock dies with its holder: the dead shim's socket is replaced, not reused."""
    namespace = f"restart-{secrets.token_hex(4)}"
    pod = "pod-" + secrets.token_hex(4)
    first = _start(tmp_path, namespace, pod, "a")
    (server,) = _servers(namespace)
    os.kill(server, 9)
    wait_until(lambda: not _servers(namespace), 15, "the killed shim to go")
    sock = first.removeprefix("unix://")
    assert os.path.exists(sock), "a SIGKILLed shim cannot remove its socket"
    second = _start(tmp_path, namespace, pod, "b")
    assert second == first
    (new_server,) = _servers(namespace)
    assert new_server != server
    asyncio.run(_shutdown(sock))
    wait_until(lambda: not _servers(namespace), 15, "the shim to go")
