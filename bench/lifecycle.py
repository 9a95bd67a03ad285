"""The lifecycle benchmark's old entry point: now the suite's `lifecycle` scenario.

    scripts/in-private-run.sh .venv/bin/python bench/lifecycle.py [--iterations N]

is the same as `scripts/bench.sh --only lifecycle [--iterations N]` (see bench/README.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.__main__ import main

    sys.exit(main(["--only", "lifecycle", *sys.argv[1:]]))
