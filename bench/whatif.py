"""What-if variants of podshim's binary, measured beside the real one: what a fix would buy.

These are prototypes for measurement only; podshim/ is not changed. Each is a script named
`containerd-shim-podshim-v1` (so the bench finds its server like the real one's) in a dir of
its own under the bench's temp dir:

  * `pyc+_exit`: the real start/delete from a copy with compiled bytecode, then `os._exit`
    as soon as the output is flushed (no interpreter finalization while containerd waits for EOF);
  * `lean`: `python -IS`, stdlib only, for the paths that need no server code: `start` when a
    live shim already serves the pod (every container after a pod's first), and `delete`
    (runc delete --force, the rootfs check, the socket check, DeleteResponse encoded by hand).
    A new pod's `start` falls through to the real code, with bytecode.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

_EXIT = r"""#!{python}
# What-if (bench/whatif.py): podshim's actions, then os._exit without finalization.
import os
import sys

from podshim.shim import main as m

args = m.parse_args(sys.argv[1:])
rc = m.start(args) if args.action == "start" else m.delete(args)
sys.stdout.flush()
os._exit(rc)
"""

_LEAN = r'''#!{python} -IS
"""What-if (bench/whatif.py): podshim's binary with stdlib-only fast paths. Not podshim."""
import os
import sys


def flag(name, default=""):
    a = sys.argv
    return a[a.index(name) + 1] if name in a[:-1] else default


def socket_path(bundle):
    import hashlib
    import json

    try:
        with open(os.path.join(bundle, "config.json")) as f:
            ann = json.load(f).get("annotations") or {{}}
    except (OSError, ValueError):
        ann = {{}}
    key = ann.get("io.containerd.runc.v2.group") or ann.get("io.kubernetes.cri.sandbox-id") or flag("-id")
    digest = hashlib.sha256(f"{{flag('-address')}}/{{flag('-namespace')}}/{{key}}".encode()).hexdigest()
    state = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(bundle))))
    path = os.path.join(state, "s", digest[:32])
    return path if len(path) <= 107 else os.path.join("/run/podshim/s", digest[:48])


def live(path):
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.1)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def full():
    sys.path[:0] = {paths!r}
    from podshim.shim import main as m

    return m


def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


action = sys.argv[-1]
if action == "start":
    bundle = os.getcwd()
    path = socket_path(bundle)
    if live(path):
        addr = "unix://" + path
        tmp = os.path.join(bundle, ".address")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, addr.encode())
        os.close(fd)
        os.replace(tmp, os.path.join(bundle, "address"))
        sys.stdout.write(addr)
    else:
        m = full()
        m.start(m.parse_args(sys.argv[1:]))
    sys.stdout.flush()
    os._exit(0)
elif action == "delete":
    import json
    import subprocess
    import time

    bundle = flag("-bundle") or os.getcwd()
    ns, cid = flag("-namespace"), flag("-id")
    try:
        with open(os.path.join(bundle, "options.json")) as f:
            opts = json.load(f)
    except (OSError, ValueError):
        opts = {{}}
    root = os.path.join(opts.get("root") or "/run/containerd/runc", ns)
    argv = [opts.get("binary_name") or "runc", "--root", root, "--log", os.path.join(bundle, "log.json"),
            "--log-format", "json", "delete", "--force", cid]
    subprocess.run(argv, capture_output=True, timeout=3.5, check=False)
    rootfs = os.path.realpath(os.path.join(bundle, "rootfs"))
    with open("/proc/self/mountinfo") as f:
        mounted = any(ln.split()[4] == rootfs or ln.split()[4].startswith(rootfs + "/") for ln in f)
    if mounted:
        full()
        from podshim.system import mounts

        mounts.unmount_all(rootfs)
    path = socket_path(bundle)
    if os.path.exists(path) and not live(path):
        os.unlink(path)
    pid = 0
    try:
        with open(os.path.join(bundle, "init.pid")) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        pass
    now = time.time_ns()
    ts = b"\x08" + varint(now // 10**9) + b"\x10" + varint(now % 10**9)
    resp = (b"\x08" + varint(pid) if pid else b"") + b"\x10" + varint(137) + b"\x1a" + varint(len(ts)) + ts
    sys.stdout.buffer.write(resp)
    sys.stdout.flush()
    os._exit(0)
else:
    full().main()
'''


def install(dest: Path, pyc_dir: Path) -> dict[str, Path]:
    """Write the what-if binaries under `dest`; returns {variant: path of its binary}."""
    python = sys.executable
    site = sysconfig.get_paths()["purelib"]
    out: dict[str, Path] = {}
    for name, text in (
        ("pyc+_exit", _EXIT.format(python=python)),
        ("lean", _LEAN.format(python=python, paths=[str(pyc_dir), site])),
    ):
        d = dest / name.replace("+", "-")
        d.mkdir(parents=True, exist_ok=True)
        path = d / "containerd-shim-podshim-v1"
        path.write_text(text)
        path.chmod(0o755)
        out[name] = path
    return out


# A fork server ("zygote"): one interpreter imports the server's modules once, then forks a server
# per pod. The children share the imported modules' pages copy-on-write until they write to them
# (CPython's reference counts and the cyclic GC do write; gc.freeze() keeps the GC off them).
ZYGOTE = r"""
import asyncio, gc, json, os, signal, socket, sys, time

from podshim import options
from podshim.shim import daemon

scratch, freeze, count = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
if freeze:
    gc.freeze()
pids = []
for i in range(count):
    path = os.path.join(scratch, f"zygote-{os.getpid()}-{i}.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(16)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = asyncio.run(
                daemon.serve(s, namespace="bench", socket_path=path, start_options=options.ShimOptions())
            )
        finally:
            os._exit(code)
    s.close()
    pids.append(pid)
time.sleep(1.0)


def mem(pid):
    out = {"rss": 0, "pss": 0, "uss": 0}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key == "Rss":
                out["rss"] = int(rest.split()[0])
            elif key == "Pss":
                out["pss"] = int(rest.split()[0])
            elif key in ("Private_Clean", "Private_Dirty"):
                out["uss"] += int(rest.split()[0])
    return out


result = {"children": [mem(p) for p in pids], "zygote": mem(os.getpid())}
for p in pids:
    os.kill(p, signal.SIGTERM)
for p in pids:
    os.waitpid(p, 0)
print(json.dumps(result))
"""
