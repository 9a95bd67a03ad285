"""The agent's log: stderr, which is the VM's console (the host keeps it in console.log)."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    try:
        with open("/proc/uptime") as f:
            up = f.read().split()[0]
    except OSError:
        up = "?"
    print(f"podshim-agent [{up}] {msg}", file=sys.stderr, flush=True)
