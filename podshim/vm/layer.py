"""The guest's userland in RAM: the agent, the python it runs on, every module it imports, and runc.

A pod VM cloned from a template (:mod:`podshim.vm.template`) must hold everything its agent needs
in guest RAM when the template is saved: qemu refuses to migrate while a 9p export is mounted,
and a file read over 9p would come back from whatever the host has there at restore time.  So
the guest's ``/usr`` is no longer the host's over 9p: it is a small tree copied from the host's
packages into a second initramfs archive, the *layer*, which the kernel unpacks after the base
archive of :mod:`podshim.vm.image` (busybox and modules).  Only the pod share is 9p, mounted
after the VM is set up for its pod.

The layer holds, at their host paths (so that the ELF interpreter and the loader's default
library dirs need no configuration): Debian's ``/usr/bin/python3.11`` with its shared libraries,
the standard-library modules the agent imports (with Debian's own bytecode), the agent package
(``/usr/lib/podshim``, with bytecode compiled here), and ``/usr/sbin/runc`` with its libraries:
runc from guest RAM starts in a fraction of the time a cold read over 9p takes under TCG.

``podshim vm-image`` builds it (:func:`prepare`): it runs the guest's python on the host to list
the modules the agent imports, and ``ldd`` for the libraries.  The result is cached under
``<image dir>/guest`` and keyed on its inputs; :func:`locate`, which the shim calls, only checks
that every input is unchanged (a stat per file and a hash of the agent's sources), and never
builds: a stale layer is an InvalidArgument naming ``podshim vm-image``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from podshim import guest as agent_package
from podshim.vm import image as vmimage

FORMAT = 1
PYTHON = "/usr/bin/python3"
RUNC = "/usr/sbin/runc"
CRUN = "/usr/bin/crun"
SUBDIR = "guest"
GUEST_AGENT_ROOT = "/usr/lib/podshim"
INIT = "/podshim/init"  # the kernel's rdinit=
# Imported lazily (os.wait4 imports resource), or by python's start-up under other locales: in
# at template time all the same, so that no import after a restore reads a file.  ctypes is not
# the agent's: it is there for guest-side tools (the hostile-guest tests use it as guest root).
EXTRA_MODULES = ("runpy", "resource", "encodings.ascii", "encodings.latin_1", "encodings.utf_8", "ctypes")

# PID 1 of a guest built with the layer.  Stage 1 runs in the initramfs: runc's pivot_root
# cannot leave an initramfs root, so it copies the tree onto a tmpfs and switch_roots there.
# Stage 2 mounts the kernel filesystems and execs the agent as PID 1: if the agent dies the
# kernel panics, and with panic=-1 and qemu's -no-reboot the VM is gone.  Nothing is mounted
# from the host here: the agent mounts the pod share when the host sets the VM up (``setup``),
# after a cold boot or after a restore from a template alike.
INIT_SCRIPT = f"""#!/bb/sh
export PATH=/usr/sbin:/usr/bin:/bb
if [ "$1" != stage2 ]; then
  /bb/mount -t proc proc /proc
  /bb/mount -t sysfs sysfs /sys
  /bb/mount -t devtmpfs devtmpfs /dev
  while read m; do /bb/insmod /mods/$m.ko || echo "podshim-init: insmod $m failed"; done < /mods/order
  /bb/mount -t tmpfs -o mode=755 root /newroot
  cd /newroot
  /bb/mkdir -p bb dev proc sys tmp run etc root var mnt podshim
  /bb/cp -a /usr ./usr
  for l in bin:usr/bin sbin:usr/sbin lib:usr/lib lib64:usr/lib64; do /bb/ln -s ${{l#*:}} ${{l%%:*}}; done
  /bb/cp -a /bb/. bb/
  /bb/cp {INIT} ./podshim/init
  /bb/mount --move /dev /newroot/dev
  /bb/mount --move /proc /newroot/proc
  /bb/mount --move /sys /newroot/sys
  exec /bb/switch_root /newroot {INIT} stage2
fi
/bb/mkdir -p /dev/pts /dev/shm /dev/mqueue
# Every busybox applet in /bb: the guest's tools for an operator's `podshim exec` (the layer
# holds no coreutils).
/bb/busybox --install -s /bb 2>/dev/null
/bb/mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
/bb/mount -t tmpfs -o mode=1777 shm /dev/shm
/bb/mount -t tmpfs -o mode=1777 tmpfs /tmp
/bb/mount -t tmpfs -o mode=755 tmpfs /run
/bb/mount -t cgroup2 cgroup2 /sys/fs/cgroup
/bb/mkdir -p {vmimage.GUEST_SHARED}
/bb/ip link set lo up
cd /
echo "podshim-init: agent $(/bb/cut -d' ' -f1 /proc/uptime)"
export PYTHONPATH={GUEST_AGENT_ROOT} PYTHONDONTWRITEBYTECODE=1
exec /usr/bin/python3 -u -S -m podshim.guest.agent
"""

# Run by the guest's python on the host: which files does importing the agent load?
_FINDER = """
import json, sys
import podshim.guest.agent
for name in sys.argv[1:]:
    __import__(name)
files = sorted({m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)})
print(json.dumps({"files": files, "executable": sys.executable}))
"""


@dataclass(frozen=True)
class Layer:
    key: str
    initrd: str  # the base archive followed by the layer: what qemu's -initrd gets


def _agent_dir() -> str:
    spec = importlib.util.find_spec("podshim.guest")
    assert spec is not None and spec.origin is not None
    return os.path.dirname(spec.origin)


def agent_hash() -> str:
    """The agent's sources and this builder's: a new podshim always needs a new layer."""
    h = hashlib.sha256(f"layer {FORMAT}\n".encode())
    with open(__file__, "rb") as f:
        h.update(f.read())
    for module in agent_package.MODULES:  # sources only: the shim checks this at every VM's start
        with open(agent_package.source_file(module), "rb") as f:
            h.update(module.encode() + b"\0" + f.read())
    return h.hexdigest()[:32]


def _identity(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _manifest_path(d: str, ahash: str) -> str:
    return os.path.join(d, SUBDIR, f"{ahash}.json")


def locate(image: vmimage.Image, ahash: str = "") -> Layer:
    """The layer built for this podshim's agent (``ahash``: :func:`agent_hash`, computed if not
    given) and these host files, or ImageError."""
    hint = f"run `podshim vm-image --dir {image.dir}` (or scripts/setup.sh)"
    path = _manifest_path(image.dir, ahash or agent_hash())
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise vmimage.ImageError(
            f"the pod VM image in {image.dir} has no guest layer for this podshim: {hint}"
        ) from None
    except (OSError, ValueError) as e:
        raise vmimage.ImageError(f"unreadable guest layer manifest {path} ({e}): {hint}") from e
    try:
        if data.get("base") != _identity(image.initrd):
            raise vmimage.ImageError(
                f"the guest layer in {image.dir} was built on another base image: {hint}"
            )
        for host, ident in data["inputs"].items():
            if _identity(host) != ident:
                raise vmimage.ImageError(f"{host} changed since the guest layer was built: {hint}")
        initrd = os.path.join(image.dir, SUBDIR, str(data["initrd"]))
        if not os.path.isfile(initrd):
            raise vmimage.ImageError(f"{initrd} is missing: {hint}")
    except OSError as e:
        raise vmimage.ImageError(f"an input of the guest layer is gone ({e}): {hint}") from e
    return Layer(str(data["key"]), initrd)


# -- building (CLI only: runs the host's python and ldd) -------------------------------------------


def _usr(path: str) -> str:
    """A host path as the guest sees it: merged /usr, whatever the host's layout."""
    for top in ("/lib64/", "/lib/", "/bin/", "/sbin/"):
        if path.startswith(top):
            return "/usr" + path
    return path


def _libraries(elf_paths: list[str], run: Callable[[list[str]], str]) -> set[str]:
    libs: set[str] = set()
    for p in elf_paths:
        for line in run(["ldd", p]).splitlines():
            parts = line.split()
            if "=>" in parts:
                target = parts[parts.index("=>") + 1]
                if target.startswith("/"):
                    libs.add(target)
            elif parts and parts[0].startswith("/"):
                libs.add(parts[0])  # the ELF interpreter
    return libs


def _entries(files: set[str]) -> dict[str, tuple[str, str]]:
    """guest path -> ("file", host path) | ("symlink", target), for every host path and the
    symlinks on the way to its real file (sonames, the interpreter's /lib64 name)."""
    out: dict[str, tuple[str, str]] = {}
    for host in sorted(files):
        real = os.path.realpath(host)
        guest, guest_real = _usr(host), _usr(real)
        out[guest_real] = ("file", real)
        if guest != guest_real:
            out[guest] = ("symlink", os.path.relpath(guest_real, os.path.dirname(guest)))
    return out


def _pyc(source: str) -> str:
    cached = importlib.util.cache_from_source(source)
    return cached if os.path.isfile(cached) else ""


def build(
    out: BinaryIO,
    agent_dir: str,
    run: Callable[[list[str]], str],
    log: Callable[[str], None] = print,
) -> dict[str, list[int]]:
    """Write the layer archive to ``out``; returns its host inputs and their identities."""
    package_root = os.path.dirname(os.path.realpath(agent_dir))  # .../podshim
    argv = ["env", "-i", f"PYTHONPATH={os.path.dirname(package_root)}", PYTHON, "-S", "-c", _FINDER]
    found = json.loads(run([*argv, *EXTRA_MODULES]))
    python = os.path.realpath(str(found["executable"]))
    modules = {f for f in found["files"] if not os.path.realpath(f).startswith(package_root + os.sep)}
    runtimes = [RUNC, *([CRUN] if os.path.exists(CRUN) else [])]
    elves = [python, *runtimes, *sorted(m for m in modules if m.endswith(".so"))]
    files = set(elves) | modules | _libraries(elves, run)
    for m in sorted(modules):
        if m.endswith(".py") and (pyc := _pyc(m)):
            files.add(pyc)
    entries = _entries(files)
    entries["/usr/bin/python3"] = ("symlink", os.path.basename(_usr(python)))
    c = vmimage.Cpio(out)
    dirs: set[str] = set()

    def parents(path: str) -> None:
        parent = os.path.dirname(path)
        if parent in ("/", "") or parent in dirs:
            return
        parents(parent)
        dirs.add(parent)
        c.directory(parent.lstrip("/"))

    inputs: dict[str, list[int]] = {}
    for guest, (kind, src) in sorted(entries.items()):
        parents(guest)
        if kind == "symlink":
            c.symlink(guest.lstrip("/"), src)
            continue
        st = os.stat(src)
        with open(src, "rb") as f:
            data = f.read()
        # The real mtime: Debian's bytecode is checked against its source's.
        c.file(guest.lstrip("/"), data, stat.S_IMODE(st.st_mode), mtime=int(st.st_mtime))
        inputs[src] = [st.st_size, st.st_mtime_ns]
    # The agent's modules with their bytecode, laid out by podshim.guest.export_files.
    for rel, data in sorted(agent_package.export_files().items()):
        guest_path = f"{GUEST_AGENT_ROOT}/podshim/guest/{rel}"
        parents(guest_path)
        c.file(guest_path.lstrip("/"), data)
    c.file(f"{GUEST_AGENT_ROOT}/podshim/__init__.py".lstrip("/"), b"")
    parents(INIT)
    c.file(INIT.lstrip("/"), INIT_SCRIPT.encode(), 0o755)
    # busybox's switch_root only leaves a root that has a regular /init (its test for an
    # initramfs); the base archive has none of its own, so the layer's init stands there too.
    c.file("init", INIT_SCRIPT.encode(), 0o755)
    c.close()
    log(f"guest layer: python {python}, {len(modules)} modules, runc, {len(entries)} files")
    return inputs


def _run(argv: list[str]) -> str:
    # A CLI-only helper, like image._run: the shim server never builds a layer.
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise vmimage.ImageError(
            f"`{' '.join(argv[:4])} …` failed: {(res.stderr or res.stdout).strip()[-500:]}"
        )
    return res.stdout


def prepare(image: vmimage.Image, *, force: bool = False, log: Callable[[str], None] = print) -> Layer:
    """Build the layer for this podshim unless an up-to-date one is cached; idempotent."""
    agent_dir = _agent_dir()
    ahash = agent_hash()
    manifest = _manifest_path(image.dir, ahash)
    for binary in (PYTHON, RUNC):
        if not os.path.exists(binary):
            raise vmimage.ImageError(f"{binary} is missing: apt-get install python3 runc")
    if not force:
        with contextlib.suppress(vmimage.ImageError):
            layer = locate(image, ahash)
            log(f"guest layer {layer.key} is up to date")
            for old in prune(image, keep=manifest):
                log(f"removed an earlier guest layer: {old}")
            return layer
    d = os.path.join(image.dir, SUBDIR)
    os.makedirs(d, exist_ok=True)
    buf = io.BytesIO()
    inputs = build(buf, agent_dir, _run, log)
    with open(image.initrd, "rb") as f:
        base = f.read()
    combined = base + buf.getvalue()
    key = hashlib.sha256(combined).hexdigest()[:32]
    name = f"initrd-{key}.cpio"
    with tempfile.NamedTemporaryFile(dir=d, prefix=".initrd-", delete=False) as tmp:
        tmp.write(combined)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, os.path.join(d, name))
    record = {"key": key, "initrd": name, "base": _identity(image.initrd), "inputs": inputs}
    with tempfile.NamedTemporaryFile("w", dir=d, prefix=".manifest-", delete=False) as mt:
        json.dump(record, mt, indent=1)
    os.chmod(mt.name, 0o644)
    # The manifest goes last: a layer interrupted half-way is never taken for a good one.
    os.replace(mt.name, manifest)
    log(f"guest layer ready: {os.path.join(d, name)} ({len(combined) >> 20} MiB with the base)")
    for old in prune(image, keep=manifest):
        log(f"removed an earlier guest layer: {old}")
    return Layer(key, os.path.join(d, name))


def prune(image: vmimage.Image, keep: str) -> list[str]:
    """Remove every guest layer but the one whose manifest is ``keep``: a layer is keyed on the
    agent's sources, so an earlier one serves no shim of this podshim.  (The templates built on
    them go with ``template.prune``.)  Returns what was removed."""
    d = os.path.join(image.dir, SUBDIR)
    with open(keep) as f:
        kept = str(json.load(f)["initrd"])
    removed = []
    for name in sorted(os.listdir(d)):
        path = os.path.join(d, name)
        stale_manifest = name.endswith(".json") and path != keep
        stale_initrd = name.startswith("initrd-") and name.endswith(".cpio") and name != kept
        if stale_manifest or stale_initrd:
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed.append(path)
    return removed
