"""The pod VM's boot image: a Debian kernel and our own initramfs, prepared once into a cache dir.

``podshim vm-image`` (and ``scripts/setup.sh``) call :func:`prepare`; the shim only calls
:func:`locate`, which never downloads anything, so a pod never waits on apt.

The kernel is Debian's ``linux-image-amd64``: the only Debian flavour with 9p, which is how the
guest reaches the host's ``/usr`` and the pod's bundles.  Its bzImage payload is decompressed
here into the ELF ``vmlinux`` that qemu boots through the PVH entry point: under TCG that skips
about 2.3 s of in-guest xz decompression and the real-mode setup code.

The initramfs is a newc cpio holding static busybox, the modules the guest needs (virtio, 9p,
overlay, net: all modules in Debian's kernel).  It has no init of its own: the kernel starts
the guest layer's through ``rdinit=``.  It is left uncompressed because decompressing it under
TCG costs more than reading 4 MB.  The guest's userland, the agent included, is a second
archive appended to this one: the guest layer of :mod:`podshim.vm.layer`, rebuilt whenever
podshim changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import lzma
import os
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from podshim.guest.paths import SHARE_DIR, SHARE_TAG

DEFAULT_DIR = "/var/lib/podshim/vm"
DIR_ENV = "PODSHIM_VM_DIR"
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX = "/bin/busybox"
MANIFEST = "manifest.json"
KERNEL_FILE = "vmlinux"
INITRD_FILE = "initrd.cpio"

# Bumped whenever the initramfs layout or /init changes, so that `vm-image` rebuilds old caches
# and the shim refuses an image whose /init does not speak to this podshim.
FORMAT = 1

# microvm's devices are virtio-mmio, found through ACPI; virtio_console carries the agent
# channel; 9p the shares; overlay a writable rootfs over a read-only one; virtio_net the pod's
# network.  Dependencies are added from each module's own .modinfo.
MODULES = ("virtio_mmio", "virtio_console", "9pnet_virtio", "9p", "overlay", "virtio_net")

BUSYBOX_APPLETS = (
    "sh", "mount", "umount", "insmod", "mkdir", "cp", "ln", "cat", "echo", "switch_root",
    "ip", "poweroff", "sleep", "ls", "rm", "dmesg", "cut",
)  # fmt: skip

# The pod share's mount tag and place in the guest: the agent's (its setup mounts it).
TAG_SHARED = SHARE_TAG
GUEST_SHARED = SHARE_DIR


class ImageError(Exception):
    """The image cannot be prepared or used; the message says what to do."""


@dataclass(frozen=True)
class Image:
    dir: str
    kernel: str
    initrd: str
    package: str
    version: str
    release: str
    modules: tuple[str, ...]
    format: int = FORMAT


def image_dir(override: str = "") -> str:
    return override or os.environ.get(DIR_ENV) or DEFAULT_DIR


# -- pure helpers (unit-tested) ---------------------------------------------------------------


def kernel_package_from_depends(apt_cache_depends: str) -> str:
    """The versioned image package behind the meta package, from `apt-cache depends` output.

    The ABI name changes with each security update (linux-image-6.1.0-57-amd64 today), so it is
    resolved every time rather than written down."""
    for line in apt_cache_depends.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "Depends:" and parts[1].startswith("linux-image-"):
            name = parts[1]
            if name[len("linux-image-") : len("linux-image-") + 1].isdigit():
                return name
    raise ImageError(
        f"apt does not know {KERNEL_META_PACKAGE}'s kernel package: run `apt-get update` "
        "(Debian's main archive must be in the sources)"
    )


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage whose payload is one xz stream (Debian's amd64 flavour)."""
    if bzimage[:4] == b"\x7fELF":
        return bzimage
    start = bzimage.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise ImageError("the kernel image has no xz payload: only xz-compressed bzImages are supported")
    try:
        elf = lzma.LZMADecompressor().decompress(bzimage[start:])
    except lzma.LZMAError as e:
        raise ImageError(f"cannot decompress the kernel payload: {e}") from e
    if elf[:4] != b"\x7fELF":
        raise ImageError("the kernel payload is not an ELF vmlinux")
    return elf


def elf_is_static(elf: bytes) -> bool:
    """True for a 64-bit little-endian ELF without a PT_INTERP program header."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", elf, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def modinfo_depends(ko: bytes) -> list[str]:
    """The `depends=` field of a module's .modinfo section, found as a plain string."""
    key = b"\0depends="
    i = ko.find(key)
    if i < 0:
        return []
    end = ko.index(b"\0", i + 1)
    return [d for d in ko[i + len(key) : end].decode().split(",") if d]


def module_name(path: str) -> str:
    return os.path.basename(path).removesuffix(".ko").replace("-", "_")


def load_order(wanted: Iterable[str], depends: Callable[[str], list[str]], known: Iterable[str]) -> list[str]:
    """Modules in an order insmod accepts: every module after the modules it depends on."""
    available = set(known)
    order: list[str] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in done:
            return
        if name in visiting:
            raise ImageError(f"module dependency cycle at {name}")
        if name not in available:
            raise ImageError(f"kernel module {name} is not in the kernel package (built in?)")
        visiting.add(name)
        for dep in depends(name):
            visit(dep)
        visiting.discard(name)
        done.add(name)
        order.append(name)

    for w in wanted:
        visit(w)
    return order


class Cpio:
    """A newc ("070701") cpio writer: enough for an initramfs; mtimes are 0 unless given, so
    builds repeat."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self._ino = 0

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
        mtime: int = 0,
    ) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + "".join(f"{v:08X}" for v in fields).encode()
        self.out.write(header + encoded)
        self._align(len(header) + len(encoded))
        self.out.write(data)
        self._align(len(data))

    def _align(self, n: int) -> None:
        if n % 4:
            self.out.write(b"\0" * (4 - n % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        self._entry(name, stat.S_IFREG | mode, data, mtime=mtime)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


def write_initramfs(out: BinaryIO, busybox: bytes, modules: Mapping[str, bytes], order: list[str]) -> None:
    c = Cpio(out)
    for d in ("bb", "dev", "proc", "sys", "newroot", "mods"):
        c.directory(d)
    c.char_device("dev/console", 5, 1)
    c.char_device("dev/null", 1, 3, 0o666)
    c.file("bb/busybox", busybox, 0o755)
    for applet in BUSYBOX_APPLETS:
        c.symlink(f"bb/{applet}", "busybox")
    for name in order:
        c.file(f"mods/{name}.ko", modules[name])
    c.file("mods/order", "".join(f"{m}\n" for m in order).encode())
    c.close()


# -- the cache --------------------------------------------------------------------------------


def locate(directory: str = "") -> Image:
    """The prepared image, or ImageError saying how to prepare it.  Never downloads."""
    d = image_dir(directory)
    hint = f"run `podshim vm-image --dir {d}` (or scripts/setup.sh)"
    try:
        with open(os.path.join(d, MANIFEST)) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ImageError(f"no pod VM image in {d}: {hint}") from None
    except (OSError, ValueError) as e:
        raise ImageError(f"unreadable pod VM image manifest in {d} ({e}): {hint}") from e
    if data.get("format") != FORMAT:
        raise ImageError(f"the pod VM image in {d} has format {data.get('format')}, not {FORMAT}: {hint}")
    image = Image(
        dir=d,
        kernel=os.path.join(d, KERNEL_FILE),
        initrd=os.path.join(d, INITRD_FILE),
        package=str(data["package"]),
        version=str(data["version"]),
        release=str(data["release"]),
        modules=tuple(data["modules"]),
    )
    for path in (image.kernel, image.initrd):
        if not os.path.isfile(path):
            raise ImageError(f"{path} is missing: {hint}")
    return image


def _run(argv: list[str], cwd: str | None = None) -> str:
    # A CLI-only helper: the shim server never calls prepare(), so plain subprocess is fine here.
    try:
        res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ImageError(f"{argv[0]} not found: podshim vm-image needs apt and dpkg (Debian)") from None
    if res.returncode != 0:
        raise ImageError(f"`{' '.join(argv)}` failed: {(res.stderr or res.stdout).strip()}")
    return res.stdout


def resolve_kernel_package() -> str:
    return kernel_package_from_depends(_run(["apt-cache", "depends", KERNEL_META_PACKAGE]))


def prepare(directory: str = "", *, force: bool = False, log: Callable[[str], None] = print) -> Image:
    """Make sure an image for the current Debian kernel is in the cache dir; idempotent."""
    d = image_dir(directory)
    if not os.path.exists(BUSYBOX):
        raise ImageError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    if not elf_is_static(busybox):
        # A dynamic busybox would need a libc the initramfs does not have.
        raise ImageError(f"{BUSYBOX} is not statically linked: apt-get install busybox-static")
    try:
        package = resolve_kernel_package()
    except ImageError as e:
        # Offline, or apt lists not fetched yet: a cached image is still good to boot.
        if force:
            raise
        try:
            current = locate(d)
        except ImageError:
            raise e from None
        log(f"cannot check for a newer kernel ({e}); keeping {current.package} in {d}")
        return current
    if not force:
        with contextlib.suppress(ImageError):
            current = locate(d)
            if current.package == package and _manifest_busybox(d) == _sha256(busybox):
                log(f"pod VM image in {d} is up to date ({package} {current.version})")
                return current
    os.makedirs(d, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=d) as work:
        log(f"downloading {package}")
        _run(["apt-get", "download", package], cwd=work)
        debs = glob.glob(os.path.join(work, f"{package}_*.deb"))
        if len(debs) != 1:
            raise ImageError(f"apt-get download {package} gave {debs or 'nothing'}")
        version = os.path.basename(debs[0]).split("_")[1]
        tree = os.path.join(work, "tree")
        _run(["dpkg-deb", "-x", debs[0], tree])
        vmlinuz = glob.glob(os.path.join(tree, "boot", "vmlinuz-*"))
        if len(vmlinuz) != 1:
            raise ImageError(f"{package} holds no single boot/vmlinuz-*")
        release = os.path.basename(vmlinuz[0]).removeprefix("vmlinuz-")
        log(f"extracting the ELF kernel from {os.path.basename(vmlinuz[0])}")
        with open(vmlinuz[0], "rb") as kf:
            elf = extract_vmlinux(kf.read())
        pattern = os.path.join(tree, "lib", "modules", release, "kernel", "**", "*.ko")
        paths = {module_name(p): p for p in glob.glob(pattern, recursive=True)}
        blobs: dict[str, bytes] = {}

        def blob(name: str) -> bytes:
            if name not in blobs:
                with open(paths[name], "rb") as mf:
                    blobs[name] = mf.read()
            return blobs[name]

        order = load_order(MODULES, lambda m: modinfo_depends(blob(m)), paths)
        log(f"building the initramfs with {len(order)} modules: {' '.join(order)}")
        with open(os.path.join(work, INITRD_FILE), "wb") as out:
            write_initramfs(out, busybox, {m: blob(m) for m in order}, order)
        with open(os.path.join(work, KERNEL_FILE), "wb") as out:
            out.write(elf)
        image = Image(
            dir=d,
            kernel=os.path.join(d, KERNEL_FILE),
            initrd=os.path.join(d, INITRD_FILE),
            package=package,
            version=version,
            release=release,
            modules=tuple(order),
        )
        manifest = dataclasses.asdict(image) | {"busybox_sha256": _sha256(busybox)}
        for k in ("dir", "kernel", "initrd"):
            del manifest[k]  # paths follow the dir, wherever it is
        with open(os.path.join(work, MANIFEST), "w") as mfile:
            json.dump(manifest, mfile, indent=1)
        # The manifest goes last: a cache interrupted half-way is never taken for a good one.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(d, MANIFEST))
        for name in (KERNEL_FILE, INITRD_FILE, MANIFEST):
            os.replace(os.path.join(work, name), os.path.join(d, name))
    log(f"pod VM image ready in {d}: {package} {version}")
    return image


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_busybox(d: str) -> str:
    try:
        with open(os.path.join(d, MANIFEST)) as f:
            return str(json.load(f).get("busybox_sha256", ""))
    except (OSError, ValueError):
        return ""
