"""Busybox bundles in a pod VM's share, as the VM backend makes them (without a snapshotter), for
the tests that drive the guest agent without containerd."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "sleep", "echo", "cat", "head", "od", "ip", "hostname", "date", "tr")


def busybox_bundle(
    share: Path, cid: str, args: list[str], edit: Callable[[dict[str, Any]], None] | None = None
) -> None:
    root = share / cid / "rootfs"
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    subprocess.run(["runc", "spec"], cwd=share / cid, check=True)
    spec = json.loads((share / cid / "config.json").read_text())
    spec["process"].update(terminal=False, args=args)
    if edit is not None:
        edit(spec)
    (share / cid / "config.json").write_text(json.dumps(spec))
