"""podshim's benchmark suite: every scenario against containerd's runc shim, side by side.

    scripts/bench.sh [--smoke] [--only SCENARIO ...]

See bench/README.md. The suite reuses the test harnesses (tests/e2e/harness for containerd and
ctr, tests/cri for the CRI containerd, client and pause image), so importing this package puts
them on sys.path, the same way tests/cri/__init__.py does for pytest.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

for _p in (REPO / "tests" / "e2e", REPO / "tests", REPO / "build" / "cri" / "py"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
