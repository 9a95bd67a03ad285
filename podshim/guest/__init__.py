"""The guest side of a pod VM.  Standard library only: it runs on the guest's python3, Debian's
``/usr/bin/python3`` copied with the modules it imports into the guest's initramfs
(:mod:`podshim.vm.layer`), without podshim's dependencies.

The agent shares each mechanism with the shim (the reaper, runc's command line, the cgroup
readers, the stdio pumps, the OOM watch): those live in ``podshim.system`` modules that import
nothing outside the standard library.  :data:`MODULES` names every podshim module the agent
imports; :func:`export_files` lays them out for the guest layer.
"""

from __future__ import annotations

import os
import sys

MODULES = (
    "podshim.guest",
    "podshim.guest.agent",
    "podshim.guest.channel",
    "podshim.guest.containers",
    "podshim.guest.diag",
    "podshim.guest.errors",
    "podshim.guest.holder",
    "podshim.guest.libc",
    "podshim.guest.log",
    "podshim.guest.netlink",
    "podshim.guest.paths",
    "podshim.guest.protocol",
    "podshim.guest.reaper",
    "podshim.guest.runc",
    "podshim.guest.session",
    "podshim.guest.stacks",
    "podshim.guest.stdio",
    "podshim.system",
    "podshim.system.cgroupfs",
    "podshim.system.children",
    "podshim.system.fds",
    "podshim.system.pump",
    "podshim.system.runc_command",
)
"""Every podshim module the guest agent imports (``tests/unit/test_guest_modules.py`` holds
this list to the agent's real import graph, and to the standard library for everything else)."""

SHARED_DIR = "system"
"""Where :func:`export_files` puts the ``podshim.system`` modules, inside the agent's export."""


def source_file(module: str) -> str:
    """The file of a module of the podshim package, found without importing it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parts = module.split(".")[1:]
    base = os.path.join(root, *parts)
    return os.path.join(base, "__init__.py") if os.path.isdir(base) else base + ".py"


def export_files() -> dict[str, bytes]:
    """The agent's export, path inside it -> content: :data:`MODULES` laid out for the guest.

    The guest layer puts the export at ``podshim/guest`` (in an empty ``podshim``
    package), so the guest package's modules go at its top and the shared ``podshim.system``
    ones into ``system/``, where :func:`_find_shared` looks for them.  Each comes with its
    bytecode: the guest writes none (its tree is read-only) and compiling ~2,000 lines at
    every boot costs a TCG guest a good part of a second."""
    files = {}
    for module in MODULES:
        parts = module.split(".")
        src = source_file(module)
        inner = [*parts[2:-1], os.path.basename(src)] if len(parts) > 2 else ["__init__.py"]
        rel = os.path.join(*(inner if parts[1] == "guest" else [SHARED_DIR, *inner]))
        with open(src, "rb") as f:
            source = f.read()
        files[rel] = source
        files.update(_bytecode(rel, source))
    return files


def _bytecode(rel: str, source: bytes) -> dict[str, bytes]:
    """``rel``'s checked-hash pyc (PEP 552): valid whatever the staged file's mtime, and used
    only by a guest python of this one's version (another ignores it and compiles)."""
    import importlib.util
    import marshal

    code = compile(source, rel, "exec", dont_inherit=True)
    flags = (0b11).to_bytes(4, "little")  # hash-based, checked against the source
    pyc = importlib.util.MAGIC_NUMBER + flags + importlib.util.source_hash(source) + marshal.dumps(code)
    name = os.path.splitext(os.path.basename(rel))[0]
    cached = os.path.join(os.path.dirname(rel), "__pycache__", f"{name}.{sys.implementation.cache_tag}.pyc")
    return {cached: pyc}


def _find_shared() -> None:
    """In a guest, ``podshim`` is an empty package with this one mounted in it, and the shared
    modules are inside this one (:func:`export_files`): let ``podshim.system`` be found there.
    On the host (and in an image that holds the whole tree) ``podshim/system`` exists and this
    does nothing."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(os.path.dirname(here), SHARED_DIR)):
        return
    if os.path.isdir(os.path.join(here, SHARED_DIR)):
        sys.modules["podshim"].__path__.append(here)


_find_shared()
