"""What a host-process container leaves on the node if its shim dies, and its removal.

A runc container is found again by ``runc delete --force`` from runc's own state; a host
process has no such state, so the shim keeps its own: ``<bundle>/host-process.json`` names the
container's cgroup and rootfs mount point.  It is written before either exists and removed once
both are gone, so the ``delete`` action that containerd runs after a shim died (SIGKILL, OOM)
can kill every process of the container (held, running or daemonised) and remove the rest.

Imported by that action, so it loads nothing heavy until there is something to clean.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from podshim.system.cgroups import Cgroup

RECORD = "host-process.json"


def write(bundle: str, cgroup: Cgroup, mount_point: str, made_mount_point: bool) -> None:
    from podshim.system import cgroups

    record = {
        "cgroup": cgroups.to_record(cgroup),
        "mount_point": mount_point,
        "made_mount_point": made_mount_point,
    }
    path = os.path.join(bundle, RECORD)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def forget(bundle: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(bundle, RECORD))


def clean_up_after_shim(bundle: str) -> None:
    """Kill and remove what a dead shim left of the host-process container of ``bundle``; a
    stat when the server deleted the container itself."""
    path = os.path.join(bundle, RECORD)
    if not os.path.exists(path):
        return
    from podshim.system import cgroups, mounts

    try:
        with open(path) as f:
            record = json.load(f)
        cg = cgroups.from_record(record.get("cgroup"))
        mount_point = str(record.get("mount_point") or "")
    except FileNotFoundError:
        return
    except (OSError, ValueError, AttributeError) as e:
        raise OSError(f"{path}: {e}") from e
    gone = cgroups.destroy(cg)
    if os.path.isabs(mount_point):
        mounts.unmount_all(mount_point)
        if record.get("made_mount_point"):
            with contextlib.suppress(OSError):
                os.rmdir(mount_point)
    if gone:
        forget(bundle)
