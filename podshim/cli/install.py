"""Registering podshim with containerd: the runtime handler stanza and the shim binary."""

from __future__ import annotations

import os
import shutil
import sys

RUNTIME_TYPE = "io.containerd.podshim.v1"
BINARY = "containerd-shim-podshim-v1"


def handler_stanza(handler: str = "podshim", options_path: str = "") -> str:
    """The containerd (version 2 config) CRI runtime handler for podshim.

    ``pod_annotations`` lets ``podshim.io/*`` pod annotations (isolation mode, host-process
    settings) through to the sandbox spec, where the shim reads them.
    """
    prefix = f'[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{handler}]'
    lines = [
        prefix,
        f'  runtime_type = "{RUNTIME_TYPE}"',
        '  pod_annotations = ["podshim.io/*"]',
        '  container_annotations = ["podshim.io/*"]',
    ]
    if options_path:
        lines += [
            f'  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{handler}.options]',
            '    TypeUrl = "podshim.v1.Options"',
            f'    ConfigPath = "{options_path}"',
        ]
    return "\n".join(lines) + "\n"


RUNTIME_CLASS = """\
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata:
  name: podshim
handler: podshim
"""


def shim_executable() -> str:
    """The console script installed beside this interpreter."""
    here = os.path.join(os.path.dirname(sys.executable), BINARY)
    return here if os.path.exists(here) else shutil.which(BINARY) or here


def link_binary(bin_dir: str) -> str:
    """Put the shim on containerd's PATH (containerd resolves runtime names there, spec §1.1)."""
    target = os.path.join(bin_dir, BINARY)
    src = shim_executable()
    if os.path.islink(target) or os.path.exists(target):
        os.unlink(target)
    os.symlink(src, target)
    return target


def add_to_config(config_path: str, handler: str = "podshim") -> bool:
    """Append the stanza unless the handler is already configured; True if the file changed."""
    existing = ""
    if os.path.exists(config_path):
        with open(config_path) as f:
            existing = f.read()
    marker = f"containerd.runtimes.{handler}]"
    if marker in existing:
        return False
    if not existing.strip():
        existing = "version = 2\n"
    with open(config_path, "w") as f:
        f.write(existing.rstrip("\n") + "\n\n" + handler_stanza(handler))
    return True
