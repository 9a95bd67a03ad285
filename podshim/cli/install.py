"""Registering podshim with containerd: the runtime handlers, their options files and the shim binary.

Two handlers, because only the node admin may grant host access (docs/configuration.md,
"Security model"):

* ``podshim``: process isolation by default; a pod may pick ``vm`` with an annotation;
* ``podshim-host``: host-process pods.  Whoever may use its RuntimeClass gets root on the node,
  so the admin decides who may (RBAC or an admission policy on ``runtimeClassName``).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

RUNTIME_TYPE = "io.containerd.podshim.v1"
BINARY = "containerd-shim-podshim-v1"
OPTIONS_DIR = "/etc/podshim"


@dataclass(frozen=True)
class Handler:
    name: str
    options: str  # the handler options file's TOML
    about: str  # a comment for the RuntimeClass


def default_handler(name: str = "podshim") -> Handler:
    return Handler(
        name,
        '# podshim runtime handler options (docs/configuration.md)\nisolation = "process"\n'
        '# What a pod may pick with podshim.io/isolation. Never add "host" here: see podshim-host.\n'
        'allowed_isolation = ["process", "vm"]\n',
        "pods run in runc containers, or in a micro-VM with podshim.io/isolation: vm",
    )


def host_handler(name: str = "podshim-host", rootfs_locations: tuple[str, ...] = ()) -> Handler:
    locations = ", ".join(f'"{loc}"' for loc in rootfs_locations)
    return Handler(
        name,
        "# Host-process pods: every container runs as a process on the node, with the node's\n"
        "# privileges. Restrict who may use this handler's RuntimeClass.\n"
        'isolation = "host"\nallowed_isolation = ["host"]\n'
        "[host]\n# Where podshim.io/hostprocess-rootfs-location may point; empty: nowhere.\n"
        f"allowed_rootfs_locations = [{locations}]\n",
        "host-process pods: root on the node. Only admins should be able to use it",
    )


def options_path(handler: str, directory: str = OPTIONS_DIR) -> str:
    return os.path.join(directory, f"{handler}.toml")


def handler_stanza(handler: str = "podshim", options_path: str = "") -> str:
    """The containerd (version 2 config) CRI runtime handler for podshim.

    ``pod_annotations`` lets ``podshim.io/*`` pod annotations (the isolation mode within what the
    handler's options allow, host-process settings) through to the sandbox spec, where the shim
    reads them.
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


def runtime_class(handler: Handler) -> str:
    return (
        f"# {handler.about}\n"
        "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n"
        f"  name: {handler.name}\nhandler: {handler.name}\n"
    )


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


def write_options(path: str, content: str) -> bool:
    """Write a handler's options file unless it exists (the admin may have edited it)."""
    if os.path.exists(path):
        return False
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with open(path, "w") as f:
        f.write(content)
    return True


def add_to_config(config_path: str, handler: str = "podshim", options_path: str = "") -> bool:
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
        f.write(existing.rstrip("\n") + "\n\n" + handler_stanza(handler, options_path))
    return True
