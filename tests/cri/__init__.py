"""CRI end-to-end tests: pods through containerd's CRI plugin, with podshim and runc as handlers.

Needs root, containerd 1.6 with its CRI plugin, runc, /usr/lib/cni, gcc (static libc) and the CRI
stubs that `scripts/gen-cri-stubs.sh` generates into build/cri/py.  This package puts that dir
and tests/e2e (for the shared harness) on sys.path.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
STUBS_DIR = _REPO / "build" / "cri" / "py"

if not (STUBS_DIR / "k8s_cri" / "runtime" / "v1" / "api_pb2_grpc.py").is_file():
    raise ImportError(
        f"the CRI stubs are missing from {STUBS_DIR}: run scripts/gen-cri-stubs.sh " "(scripts/setup.sh does)"
    )
for _p in (_REPO / "tests" / "e2e", STUBS_DIR):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
