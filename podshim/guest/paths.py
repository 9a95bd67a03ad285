"""Where the agent keeps things in the guest, and the environment of the programs it runs."""

from __future__ import annotations

RUNC = "/usr/sbin/runc"
RUNC_ROOT = "/run/runc"
STATE = "/run/podshim/agent-state"
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
