"""Where the agent keeps things in the guest, and the environment of the programs it runs."""

from __future__ import annotations

import os

# crun where the guest layer has it (it starts in a fraction of runc's time under TCG); both
# take the same commands.
RUNC = "/usr/bin/crun" if os.path.exists("/usr/bin/crun") else "/usr/sbin/runc"
RUNC_ROOT = "/run/runc"
STATE = "/run/podshim/agent-state"
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
BUSYBOX = "/bb/busybox"
SHARE_TAG = "podshim-shared"
SHARE_DIR = "/run/podshim/shared"
SHARE_OPTIONS = "trans=virtio,version=9p2000.L,msize=262144,cache=mmap"
