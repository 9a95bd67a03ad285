"""The pod share: what the guest sees of its containers' bundles, and where the shim builds them.

The guest may be hostile, and qemu's 9p server writes to the host as root on its behalf.  So the
shim never works in a directory the guest can change:

* ``<run>/stage`` is a tmpfs of the shim's own, never exported.  Each container's bundle is built
  there: ``<id>/config.json``, ``<id>/rootfs`` (the rootfs mounted on it) and
  ``<id>/mounts/<n>`` (each host file or dir the spec binds, bind-mounted on it).
* ``<run>/shared``, the directory qemu exports, is a read-only bind of the stage that receives
  its later mounts (a slave of it).  The guest can read the bundles, and write inside a rootfs
  or a read-write bind (the mounts themselves), but it can create, rename or remove nothing in
  the tree the shim works in: no component the shim walks can become a symlink.
* Even so, every path below the stage is opened with openat2 (:mod:`podshim.system.safepath`),
  mounts go through ``/proc/self/fd``, and what is unmounted is what this object recorded when
  it mounted it, reopened the same way: never a path as the guest would have it resolve.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
from typing import Any

from podshim import errdefs
from podshim.backends.vm.spec import Bind
from podshim.system import mounts, safepath

log = logging.getLogger(__name__)

STAGE = "stage"
VIEW = "shared"
STAGE_OPTIONS = "mode=0711,size=16m"  # config.json files and mount points only
DIAG_DIR = ".diag"  # Diag.Share's host paths


def stage_dir(run_dir: str) -> str:
    return os.path.join(run_dir, STAGE)


class PodShare:
    def __init__(self, run_dir: str) -> None:
        self.stage = stage_dir(run_dir)
        self.view = os.path.join(run_dir, VIEW)
        self._fd = -1
        self._mounted: dict[str, list[str]] = {}  # container id -> mount points below the stage
        self._own: list[str] = []  # the stage and the view themselves

    def open(self) -> None:
        """Mount the stage and its read-only view (before qemu starts: it exports the view)."""
        os.makedirs(self.stage, mode=0o700, exist_ok=True)
        os.makedirs(self.view, mode=0o700, exist_ok=True)
        try:
            nosuid = mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC
            mounts._sys_mount("podshim-stage", self.stage, "tmpfs", nosuid, STAGE_OPTIONS)
            self._own.append(self.stage)
            # A peer group of its own, so that the view follows the stage and nothing else.
            mounts._sys_mount("", self.stage, "", mounts.MS_PRIVATE, "")
            mounts._sys_mount("", self.stage, "", mounts.MS_SHARED, "")
            mounts._sys_mount(self.stage, self.view, "", mounts.MS_BIND, "")
            self._own.append(self.view)
            ro = mounts.MS_REMOUNT | mounts.MS_BIND | mounts.MS_RDONLY | nosuid
            mounts._sys_mount("", self.view, "", ro, "")
            mounts._sys_mount("", self.view, "", mounts.MS_SLAVE, "")
            self._fd = os.open(self.stage, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            self.close()
            raise errdefs.ShimError(f"cannot set up the pod share in {self.stage}: {e}") from e

    # -- one container ------------------------------------------------------------------------

    def add(self, cid: str, spec: dict[str, Any], rootfs: list[mounts.Mount], binds: list[Bind]) -> None:
        """Build ``cid``'s bundle: its rootfs from ``rootfs`` (mounts onto it, or one bind), each
        bind, then the guest's ``config.json``.  On failure nothing of it is left."""
        if not cid or "/" in cid or cid in (".", ".."):
            raise errdefs.InvalidArgument(f"container id {cid!r} cannot name a bundle")
        try:
            safepath.mkdir_beneath(self._fd, cid, 0o711)
        except FileExistsError:
            raise errdefs.AlreadyExists(f"container {cid} already has a bundle in the pod VM") from None
        self._mounted[cid] = []
        try:
            safepath.mkdir_beneath(self._fd, f"{cid}/rootfs", 0o755)
            for m in rootfs:
                self._mount(cid, "rootfs", m)
            if binds:
                safepath.mkdir_beneath(self._fd, f"{cid}/mounts", 0o711)
            for bind in binds:
                self._bind(cid, bind)
            data = json.dumps(spec).encode()
            safepath.write_beneath(self._fd, f"{cid}/config.json", data)
        except BaseException:
            self.remove(cid)
            raise

    def _mount(self, cid: str, rel: str, m: mounts.Mount) -> None:
        path = f"{cid}/{rel}"
        try:
            with safepath.beneath(self._fd, path) as target:
                mounts.mount_new(m, target)
            self._mounted[cid].append(path)
            with safepath.beneath(self._fd, path) as target:  # now the new mount's root
                mounts.settle(m, target)
        except OSError as e:
            raise errdefs.ShimError(f"cannot mount {m.type} {m.source} for {cid}: {e}") from e

    def _bind(self, cid: str, bind: Bind, options: tuple[str, ...] = ("rbind",)) -> None:
        """Bind the host path ``bind.source`` at ``<cid>/<bind.name>``; the source is opened once,
        and what is mounted is what was opened (a file or a dir, as it is then)."""
        try:
            src = os.open(bind.source, os.O_PATH | os.O_CLOEXEC)
        except OSError as e:
            raise errdefs.InvalidArgument(f"cannot share mount source {bind.source} with the VM: {e}") from e
        try:
            rel = f"{cid}/{bind.name}"
            if stat.S_ISDIR(os.fstat(src).st_mode):
                safepath.mkdir_beneath(self._fd, rel, 0o755)
            else:
                safepath.write_beneath(self._fd, rel, b"")
            self._mount(cid, bind.name, mounts.Mount("bind", f"/proc/self/fd/{src}", options))
        finally:
            os.close(src)

    def remove(self, cid: str) -> None:
        """Unmount what was mounted for ``cid``, newest first, then remove its bundle.  A mount
        that cannot be undone keeps the bundle in place (rmtree would go into the mount)."""
        points = self._mounted.pop(cid, None)
        if points is None:
            return
        clean = True
        for rel in reversed(points):
            try:
                with safepath.beneath(self._fd, rel) as target:
                    mounts.detach(target, follow=True)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOENT):
                    log.warning("pod share: cannot unmount %s/%s: %s", self.stage, rel, e)
                    clean = False
        if clean:
            shutil.rmtree(cid, dir_fd=self._fd, ignore_errors=True)

    # -- Diag.Share -----------------------------------------------------------------------------

    def add_path(self, name: str, source: str, writable: bool) -> str:
        """An operator's host path (``podshim share``) at ``.diag/<name>``, read-only unless
        ``writable`` (enforced here, on the host side of 9p); returns its path below the share.
        ``.diag`` cannot be a container id (ids start with a letter or digit); it goes with the
        share."""
        if DIAG_DIR not in self._mounted:
            safepath.mkdir_beneath(self._fd, DIAG_DIR, 0o711)
            self._mounted[DIAG_DIR] = []
        rel = f"{DIAG_DIR}/{name}"
        self._bind(DIAG_DIR, Bind(source, name, False), ("rbind",) if writable else ("rbind", "ro"))
        if not writable:
            # A remount does not propagate: the copy of the mount in the view, which qemu exports,
            # is still read-write.  Make that one read-only too (the guest cannot change the view).
            ro = mounts.MS_REMOUNT | mounts.MS_BIND | mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NODEV
            view = os.open(self.view, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                with safepath.beneath(view, rel) as target:
                    mounts._sys_mount("", target, "", ro, "")
            except OSError:
                with safepath.beneath(self._fd, rel) as target:  # not shared at all, then
                    mounts.detach(target, follow=True)
                self._mounted[DIAG_DIR].remove(rel)
                raise
            finally:
                os.close(view)
        return rel

    # -- the share ----------------------------------------------------------------------------

    def close(self) -> None:
        for cid in list(self._mounted):
            self.remove(cid)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        while self._own:
            with contextlib.suppress(OSError):
                mounts.detach(self._own.pop())
