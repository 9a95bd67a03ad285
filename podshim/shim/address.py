"""Where a shim listens, and the ``address`` file containerd reads back (spec §1.3).

The socket sits under containerd's own state directory, so a containerd whose state is in a
temp dir never meets the host's; the name hashes containerd's address, the namespace and the
grouping key, so every container of a pod finds the same shim.

One shim per pod: the server holds an ``flock`` on ``<socket>.lock`` for its whole life, and
that lock, not a connect attempt, says whether a shim serves the socket (a live shim under load
can miss any connect timeout; the kernel drops the lock the moment its holder dies).  The
actions that look at or change the socket (``start`` binding it, ``delete`` and the server's
shutdown removing it) do so under a short lock on the socket directory, so a ``start`` that
finds the lifetime lock held also finds the socket listening.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Iterator

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


LOCK_SUFFIX = ".lock"


@contextlib.contextmanager
def _directory_locked(directory: str) -> Iterator[None]:
    """Serialise every check-and-change of the sockets in ``directory`` (held for microseconds)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _try_lock(path: str, create: bool) -> int | None:
    """The lifetime lock file of socket ``path``, locked; None if a live shim holds it (or, with
    ``create`` false, if there is no lock file)."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path + LOCK_SUFFIX, flags, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class Listener:
    """A bound, listening socket and the lifetime lock that makes its holder the pod's shim.

    The lock is an open file description: a forked server that inherits ``lock_fd`` holds it
    until its last copy is closed, that is until the server exits.  (A plain class: the
    dataclasses import costs every ``start`` a few ms.)"""

    def __init__(self, sock: socket.socket, lock_fd: int) -> None:
        self.sock = sock
        self.lock_fd = lock_fd

    def close(self) -> None:
        self.sock.close()
        os.close(self.lock_fd)


def listen(path: str) -> Listener | None:
    """Become the shim of ``path``: take its lifetime lock, bind and listen.  None when a live
    shim holds the lock: it is listening on ``path`` (reuse it)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    with _directory_locked(directory):
        lock_fd = _try_lock(path, create=True)
        if lock_fd is None:
            return None
        try:
            # Nobody holds the lock: whatever socket file is here belongs to a dead shim.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.bind(path)
                os.chmod(path, 0o600)
                s.listen(128)
            except BaseException:
                s.close()
                raise
        except BaseException:
            os.close(lock_fd)
            raise
        return Listener(s, lock_fd)


def _served(path: str) -> bool:
    """Whether a live shim serves socket ``path`` (the caller holds the directory lock): its
    lifetime lock is held, or, for a shim from before the lock (no lock file), its socket still
    accepts connections."""
    fd = _try_lock(path, create=False)
    if fd is not None:
        os.close(fd)
        return False
    if os.path.exists(path + LOCK_SUFFIX):
        return True
    return os.path.exists(path) and not _refused(path)


def is_served(path: str) -> bool:
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        return False
    with _directory_locked(directory):
        return _served(path)


def remove_if_dead(path: str) -> None:
    """Remove the socket and lock file of a shim that no longer runs (the ``delete`` action)."""
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        return
    with _directory_locked(directory):
        if not _served(path):
            _unlink(path)


def _refused(path: str, kind: int = socket.SOCK_STREAM) -> bool:
    """True when nothing listens on the unix socket ``path``: for a unix socket the kernel
    answers at once, ECONNREFUSED (or ENOENT), with no timeout to guess."""
    s = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK)
    try:
        s.connect(path)
        return False
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except OSError:
        return False  # EAGAIN: a full backlog is a live listener
    finally:
        s.close()


def remove_own(path: str) -> None:
    """The server's last act: its socket and lock file go, while it still holds the lock, so a
    concurrent ``start`` either finds both (and this shim) or neither (and starts a new one)."""
    with contextlib.suppress(FileNotFoundError), _directory_locked(os.path.dirname(path)):
        _unlink(path)


def is_live(path: str, kind: int = socket.SOCK_STREAM) -> bool:
    """Whether something listens on ``path`` (the zygote's socket, which has no lifetime lock:
    a zygote that is gone costs speed only)."""
    return not _refused(path, kind)


def listen_unlocked(path: str, kind: int, backlog: int) -> socket.socket | None:
    """Bind and listen on ``path`` without a lifetime lock (the zygote, SOCK_SEQPACKET); None
    when a live listener already serves it."""
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


def _unlink(path: str) -> None:
    for p in (path, path + LOCK_SUFFIX):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


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
