"""Where a shim listens, and the ``address`` file containerd reads back (spec §1.3).

The socket sits under containerd's own state directory, so a containerd whose state is in a
temp dir never meets the host's; the name hashes containerd's address, the namespace and the
grouping key, so every container of a pod finds the same shim.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket

try:
    # The builtin module, not hashlib: hashlib loads OpenSSL, ~3.5 MiB more RSS in every shim.
    from _sha256 import sha256  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - other Pythons name it differently
    from hashlib import sha256

MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the terminating NUL
FALLBACK_DIR = "/run/podshim/s"


def state_dir(bundle: str) -> str:
    """containerd's state dir, from a bundle at <state>/io.containerd.runtime.v2.task/<ns>/<id>."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(bundle))))


def socket_path(grpc_address: str, namespace: str, key: str, bundle: str) -> str:
    digest = sha256(f"{grpc_address}/{namespace}/{key}".encode()).hexdigest()
    preferred = os.path.join(state_dir(bundle), "s", digest[:32])
    if len(preferred) <= MAX_SOCKET_PATH:
        return preferred
    return os.path.join(FALLBACK_DIR, digest[:48])


def is_live(path: str, timeout: float = 0.1, kind: int = socket.SOCK_STREAM) -> bool:
    s = socket.socket(socket.AF_UNIX, kind)
    s.settimeout(timeout)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def listen(path: str, kind: int = socket.SOCK_STREAM, backlog: int = 128) -> socket.socket | None:
    """Bind and listen on path; None when a live shim already serves it (reuse it). The zygote
    (zygote.py) listens the same way, with SOCK_SEQPACKET."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    for _ in range(2):
        s = socket.socket(socket.AF_UNIX, kind)
        try:
            s.bind(path)
        except OSError as e:
            s.close()
            if e.errno != errno.EADDRINUSE:
                raise
            if is_live(path, kind=kind):
                return None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        os.chmod(path, 0o600)
        s.listen(backlog)
        return s
    raise OSError(errno.EADDRINUSE, f"cannot listen on {path}")


def remove_if_dead(path: str) -> None:
    if os.path.exists(path) and not is_live(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def write_address_file(bundle: str, address: str) -> None:
    """Atomically, and with no trailing newline: containerd reads it back verbatim."""
    tmp = os.path.join(bundle, ".address")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, address.encode())
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(bundle, "address"))
