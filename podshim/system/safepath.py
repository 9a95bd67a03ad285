"""Path operations that cannot be led out of a directory: every lookup goes through openat2(2)
with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS``, so a component that is
``..``, absolute, or swapped for a symlink fails (ELOOP, EXDEV) instead of reaching another part
of the host.  Kernels without openat2 (before 5.6) get the same from an ``O_PATH | O_NOFOLLOW``
walk, one component at a time.  What is then done to the file (mount, unmount) goes through
``/proc/self/fd/N`` of the opened fd, never through the path again.

This is how the shim works in a directory that a VM guest shares (CVE-2021-30465 in runc and
CVE-2020-2026 in Kata were both a guest-writable path component swapped for a symlink).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

SYS_OPENAT2 = 437  # one number on every architecture (the unified syscall table since 5.1)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_have_openat2 = True


def _parts(rel: str) -> list[str]:
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if rel.startswith("/") or ".." in parts:
        raise OSError(errno.EXDEV, f"{rel!r} is not a path beneath its directory")
    return parts


def _openat2(dirfd: int, rel: str, flags: int, mode: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, RESOLVE)
    fd = _libc.syscall(
        SYS_OPENAT2, ctypes.c_int(dirfd), os.fsencode(rel or "."), ctypes.byref(how), ctypes.sizeof(how)
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"openat2 {rel!r}: {os.strerror(err)}")
    return int(fd)


def _walk(dirfd: int, parts: list[str], flags: int, mode: int) -> int:
    fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        if not parts:
            return os.open(".", flags | os.O_CLOEXEC, dir_fd=fd)
        last = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    finally:
        os.close(fd)
    if stat.S_ISLNK(os.fstat(last).st_mode):  # O_PATH|O_NOFOLLOW opens the link itself
        os.close(last)
        raise OSError(errno.ELOOP, f"{'/'.join(parts)!r} is a symlink")
    return last


def open_beneath(dirfd: int, rel: str, flags: int = os.O_PATH, mode: int = 0o644) -> int:
    """Open ``rel`` below the directory ``dirfd`` without following any symlink or leaving it."""
    global _have_openat2
    parts = _parts(rel)
    if _have_openat2:
        try:
            return _openat2(dirfd, "/".join(parts), flags, mode)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            _have_openat2 = False
    return _walk(dirfd, parts, flags, mode)


@contextmanager
def beneath(dirfd: int, rel: str, flags: int = os.O_PATH) -> Iterator[str]:
    """``rel`` opened beneath ``dirfd``, as a ``/proc/self/fd`` path for mount(2) and friends."""
    fd = open_beneath(dirfd, rel, flags)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def mkdir_beneath(dirfd: int, rel: str, mode: int = 0o755) -> None:
    parts = _parts(rel)
    parent = open_beneath(dirfd, "/".join(parts[:-1]), os.O_PATH | os.O_DIRECTORY)
    try:
        os.mkdir(parts[-1], mode, dir_fd=parent)
    finally:
        os.close(parent)


def write_beneath(dirfd: int, rel: str, data: bytes, mode: int = 0o644) -> None:
    """Create ``rel`` (it must not exist) holding ``data``."""
    fd = open_beneath(dirfd, rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
