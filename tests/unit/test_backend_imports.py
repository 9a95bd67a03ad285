"""Item: a backend imports every module it can need when it is created, not at first use, so a
shim that lives through a package upgrade never mixes old and new code."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Run in a fresh interpreter: this test session has imported everything long ago.
SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys
    from podshim.backends.{module} import {cls}
    from podshim.system import cgroups

    async def main():
        backend = {make}
        backend.preload()
        before = set(sys.modules)
        try:
            cgroups.metrics(cgroups.Cgroup.of_pid(os.getpid()))  # what Stats runs
        except Exception:
            pass
        new = sorted(m for m in set(sys.modules) - before if m.startswith(("podshim", "google", "pyroute2")))
        print(" ".join(new))

    asyncio.run(main())
    """
)

BACKENDS = {
    "runc": ("runc.backend", "RuncBackend", "RuncBackend(__import__('podshim.backends.runc.backend', "
             "fromlist=['x']).RuncSettings(), 'ns', lambda cid: None)"),
    "host": ("host.backend", "HostBackend", "HostBackend('ns', lambda cid: None, "
             "__import__('podshim.options', fromlist=['x']).ShimOptions())"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_no_module_is_imported_after_the_backend_is_created(name: str) -> None:
    module, cls, make = BACKENDS[name]
    code = SCRIPT.format(module=module, cls=cls, make=make)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "", f"imported at first use: {out.stdout.strip()}"


def test_the_vm_backend_lists_what_it_imports_late() -> None:
    from podshim.backends.vm.backend import VMBackend

    late = {"pyroute2", "google.protobuf.json_format", "podshim.api.cgroups_v2_pb2"}
    assert late <= set(VMBackend.lazy_modules)
    VMBackend.preload()
