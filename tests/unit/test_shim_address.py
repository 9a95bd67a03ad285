"""The socket's lifetime lock: who is the pod's shim, and when its socket may go."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from podshim.shim import address
from podshim.shim.address import LOCK_SUFFIX


def _hold_in_child(path: str) -> tuple[int, int]:
    """Fork a child that becomes the shim of ``path`` and waits; (pid, fd to release it)."""
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(w)
            listener = address.listen(path)
            os.write(ready_w, b"1" if listener is not None else b"0")
            os.read(r, 1)
        finally:
            os._exit(0)
    os.close(r)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    return pid, w


def test_a_held_lock_means_a_live_shim(tmp_path: Path) -> None:
    path = str(tmp_path / "s" / "pod")
    pid, release = _hold_in_child(path)
    try:
        assert address.listen(path) is None  # reuse the live shim
        assert address.is_served(path)
        address.remove_if_dead(path)
        assert os.path.exists(path) and os.path.exists(path + LOCK_SUFFIX)
    finally:
        os.close(release)
        os.waitpid(pid, 0)
    # Its holder gone, the lock is free: the socket and lock file are a dead shim's.
    assert not address.is_served(path)
    address.remove_if_dead(path)
    assert not os.path.exists(path) and not os.path.exists(path + LOCK_SUFFIX)


def test_a_killed_shims_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "s" / "pod")
    pid, release = _hold_in_child(path)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(release)
    assert os.path.exists(path)
    listener = address.listen(path)
    assert listener is not None
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)  # the new socket, not the dead one
        assert address.is_served(path)
    finally:
        listener.close()
    address.remove_own(path)
    assert not os.path.exists(path) and not os.path.exists(path + LOCK_SUFFIX)


def test_without_a_lock_file_only_a_refusing_socket_is_dead(tmp_path: Path) -> None:
    """A shim from before the lock has no lock file: its socket goes only once nothing listens."""
    path = str(tmp_path / "pod")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(1)
    try:
        assert address.is_served(path)
        address.remove_if_dead(path)
        assert os.path.exists(path)
    finally:
        s.close()
    assert not address.is_served(path)
    address.remove_if_dead(path)
    assert not os.path.exists(path)
