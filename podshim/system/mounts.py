"""Rootfs mounts onto ``<bundle>/rootfs`` and their removal (spec §5.3, §7.16)."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from podshim import errdefs

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

# option -> (clear?, flag)
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}
_PROPAGATION = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}

_libc = ctypes.CDLL(None, use_errno=True)  # libc is already loaded: no find_library (it runs ldconfig)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""


def parse_options(options: tuple[str, ...] | list[str]) -> tuple[int, int, str]:
    """Split mount options into (flags, propagation flags, data string)."""
    flags = prop = 0
    data: list[str] = []
    for opt in options:
        if opt in _FLAGS:
            clear, flag = _FLAGS[opt]
            flags = flags & ~flag if clear else flags | flag
        elif opt in _PROPAGATION:
            prop |= _PROPAGATION[opt]
        else:
            data.append(opt)
    return flags, prop, ",".join(data)


def _sys_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    rc = _libc.mount(
        source.encode(), target.encode(), fstype.encode() if fstype else None, flags, data.encode() or None
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} ({fstype}): {os.strerror(err)}")


def mount(m: Mount, target: str) -> None:
    mount_new(m, target)
    settle(m, target)


def mount_new(m: Mount, target: str) -> None:
    """The mount itself.  Its flags on a bind and its propagation need :func:`settle` after it:
    given a ``/proc/self/fd`` target, reopen the target first, so that it names the new mount."""
    if m.type == "loop" or "loop" in m.options:
        raise errdefs.NotImplementedErr("loop mounts are not supported")
    flags, _prop, data = parse_options(m.options)
    fstype = m.type
    if fstype.startswith("fuse."):
        raise errdefs.NotImplementedErr(f"mount type {fstype} is not supported")
    _sys_mount(m.source, target, fstype, flags & ~MS_REMOUNT if flags & MS_BIND else flags, data)


def settle(m: Mount, target: str) -> None:
    flags, prop, _data = parse_options(m.options)
    if flags & MS_BIND and flags & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC):
        # A read-only bind needs a second, remounting call: the kernel ignores ro on the first.
        _sys_mount("", target, "", flags | MS_REMOUNT | MS_BIND, "")
    if prop:
        _sys_mount("", target, "", prop, "")


def detach(target: str, follow: bool = False) -> None:
    """Lazily unmount the mount at ``target``.  A symlink there is followed only with ``follow``,
    which a ``/proc/self/fd`` target needs."""
    if _libc.umount2(target.encode(), MNT_DETACH | (0 if follow else UMOUNT_NOFOLLOW)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unmount {target}: {os.strerror(err)}")


def mount_all(mounts: list[Mount], target: str) -> None:
    os.makedirs(target, mode=0o711, exist_ok=True)
    done = 0
    try:
        for m in mounts:
            mount(m, target)
            done += 1
    except OSError as e:
        unmount_all(target)
        raise errdefs.ShimError(f"failed to mount rootfs component {mounts[done]}: {e}") from e
    except errdefs.ShimError:
        unmount_all(target)
        raise


def _mount_points() -> list[str]:
    """Every mount point, once per mount (a point with mounts stacked on it is listed as often)."""
    points: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split(" ", 5)
            if len(parts) > 4:
                points.append(parts[4].encode().decode("unicode_escape"))
    return points


def unmount_all(target: str) -> None:
    """Detach every mount at or below target, deepest first.

    One parse of mountinfo for the whole batch (it may be thousands of lines on a busy node,
    and this runs on the shim's only thread): each mount found is detached once, stacked ones
    included; EINVAL means a detach higher up already took it along."""
    target = os.path.realpath(target)
    below = [p for p in _mount_points() if p == target or p.startswith(target + "/")]
    for p in sorted(below, key=lambda p: p.count("/"), reverse=True):
        if _libc.umount2(p.encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err not in (22, 2):  # EINVAL: not a mount (any more); ENOENT: gone
                raise OSError(err, f"unmount {p}: {os.strerror(err)}")
