"""The runtimes the e2e tests compare: containerd's own runc shim is the reference for podshim."""

from __future__ import annotations

RUNC_V2 = "io.containerd.runc.v2"
PODSHIM = "io.containerd.podshim.v1"
RUNTIMES = [RUNC_V2, PODSHIM]

_IDS = {RUNC_V2: "runc-v2", PODSHIM: "podshim"}


def runtime_id(runtime: str) -> str:
    """Short test-id form: test_x[runc-v2-…] / test_x[podshim-…]."""
    return _IDS.get(runtime, runtime)
