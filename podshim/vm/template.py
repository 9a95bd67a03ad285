"""VM templates: boot a pod VM once per shape, save it when its agent is idle, clone it per pod.

Kata calls this VM templating.  A template VM boots with its RAM in a shared file
(``memory-backend-file,share=on``); once its agent answers, qemu saves its device and CPU state
with ``x-ignore-shared``, so the state file holds only a few dozen KiB and the RAM stays in the
memory file.  A clone maps that file privately (``share=off``: its writes are copies of its own,
and the file never changes) and resumes from the state file with ``-incoming defer``: about
0.1 s under TCG instead of seconds of kernel boot and python start.  Every clone of a node
shares the template's untouched pages through the page cache, which is the memory saving and
also the security trade-off (docs/vm-isolation.md).

A template serves one *shape*: memory, vCPUs, kernel, initramfs (with the guest layer), the
accelerator, qemu's binary and its device set (the whole command line).  Its directory under
:func:`root` is named by a hash of all of it, so a template for anything that changed is never
found, and the next pod builds a new one.

* **One builder.**  Builders of a key take ``<key>.lock`` with ``flock``; the others wait for it
  and then use what it built.  The lock dies with its holder.
* **Never half-written.**  A template is built in a ``.build-*`` directory and renamed into
  place once the memory file, the state file and ``meta.json`` are all written.
* **Never changed under a clone.**  A private mapping still sees later writes to pages it has
  not copied, so a template is never rewritten: a bad one is renamed away and unlinked (clones
  that map it keep their pages), and the next pod builds a new one.
* **Failing safe.**  When a build fails (an old qemu, a shape that cannot be saved), the reason
  is written beside the key; pods boot cold and log it, and a new build is tried only after
  :data:`RETRY_AFTER` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

from podshim.system.blocking import off_loop
from podshim.vm import image as vmimage
from podshim.vm import qemu
from podshim.vm.client import AgentClient

log = logging.getLogger(__name__)

FORMAT = 1
DIR_ENV = "PODSHIM_VM_TEMPLATE_DIR"
SUBDIR = "templates"
MEMORY_FILE = "memory"
STATE_FILE = "state"
META_FILE = "meta.json"
BUILD_TIMEOUT = 240.0  # a TCG boot waiting for a boot slot on a busy host, then the save
RETRY_AFTER = 600.0
TEMPLATE_NAME = "podshim-template"


class TemplateUnavailable(Exception):
    """No template can serve this shape now; the message says why (pods boot cold)."""


@dataclass(frozen=True)
class Shape:
    memory_mib: int
    vcpus: int
    kernel: str
    initrd: str
    faults: bool = False
    tb_size_mib: int = 0  # qemu's translation cache under TCG (0: qemu's default here)

    def config(
        self,
        name: str,
        run_dir: str,
        boot: qemu.Boot,
        memory_file: str = "",
        state_file: str = "",
        netns: str = "",
        tap: qemu.Tap | None = None,
    ) -> qemu.VMConfig:
        """A VM of this shape: the template's, a clone of it, or a cold one."""
        return qemu.VMConfig(
            name=name,
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            kernel=self.kernel,
            initrd=self.initrd,
            tb_size_mib=self.tb_size_mib,
            run_dir=run_dir,
            netns=netns,
            tap=tap,
            faults=self.faults,
            boot=boot,
            memory_file=memory_file,
            state_file=state_file,
        )


@dataclass(frozen=True)
class Template:
    key: str
    dir: str
    shape: Shape

    @property
    def memory_file(self) -> str:
        return os.path.join(self.dir, MEMORY_FILE)

    @property
    def state_file(self) -> str:
        return os.path.join(self.dir, STATE_FILE)


def root(image_dir: str = "") -> str:
    return os.environ.get(DIR_ENV) or os.path.join(vmimage.image_dir(image_dir), SUBDIR)


def _identity(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def key(shape: Shape, accel: qemu.Accel) -> str:
    """A hash of everything that makes a template fit a clone: the whole template command line
    (device set, machine, memory, vCPUs, kernel command line; per-VM paths fixed), and the
    identity of qemu's binary, the kernel and the initramfs."""
    argv = qemu.qemu_argv(shape.config(TEMPLATE_NAME, "/run", qemu.Boot.TEMPLATE, "/memory"), accel, 0)
    binary = shutil.which(qemu.QEMU)
    if binary is None:
        raise TemplateUnavailable(f"{qemu.QEMU} not found")
    try:
        inputs = {
            "format": FORMAT,
            "argv": argv,
            "qemu": _identity(binary),
            "kernel": _identity(shape.kernel),
            "initrd": _identity(shape.initrd),
        }
    except OSError as e:
        raise TemplateUnavailable(f"an input of the template is missing: {e}") from e
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def _load(d: str, k: str, shape: Shape) -> Template | None:
    t = Template(k, d, shape)
    if (
        os.path.isfile(os.path.join(d, META_FILE))
        and os.path.isfile(t.memory_file)
        and os.path.isfile(t.state_file)
    ):
        return t
    return None


def _failure(path: str) -> str:
    """The reason of a recent failed build of this key, or ""."""
    try:
        with open(path) as f:
            data = json.load(f)
        if time.time() - float(data["at"]) < RETRY_AFTER:
            return str(data["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return ""


async def _lock(path: str, deadline: float) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
        if time.monotonic() > deadline:
            os.close(fd)
            raise TemplateUnavailable("another builder held the template lock too long")
        await asyncio.sleep(0.05)


Builder = Callable[[Shape, str, str], Awaitable[dict[str, float]]]


async def ensure(shape: Shape, directory: str = "", builder: Builder | None = None) -> Template:
    """The template for ``shape``, built now if there is none (one builder at a time, host-wide).

    Raises TemplateUnavailable when none can be had; the caller boots cold."""
    accel = qemu.detect_accel()
    k = key(shape, accel)
    top = directory or root()
    d = os.path.join(top, k)
    if (t := _load(d, k, shape)) is not None:
        return t
    os.makedirs(top, mode=0o700, exist_ok=True)
    failed = os.path.join(top, f"{k}.failed")
    if reason := _failure(failed):
        raise TemplateUnavailable(f"building it failed recently: {reason}")
    fd = await _lock(os.path.join(top, f"{k}.lock"), time.monotonic() + BUILD_TIMEOUT)
    try:
        if (t := _load(d, k, shape)) is not None:
            return t  # built by the holder we waited for
        if reason := _failure(failed):
            raise TemplateUnavailable(f"building it failed recently: {reason}")
        if os.path.exists(d):
            # Not complete (no meta.json), or its files are gone: never used, replaced.
            invalidate(Template(k, d, shape), "incomplete")
        work = tempfile.mkdtemp(prefix=f".build-{k}-", dir=top)
        try:
            stats = await (builder or build)(shape, work, k)
            meta = {"key": k, "shape": asdict(shape), "accel": accel.name, "built_at": time.time(), **stats}
            with open(os.path.join(work, META_FILE), "w") as f:
                json.dump(meta, f, indent=1)
            for name in (MEMORY_FILE, STATE_FILE, META_FILE):
                os.chmod(os.path.join(work, name), 0o400)
            os.rename(work, d)
        except BaseException as e:
            shutil.rmtree(work, ignore_errors=True)
            if isinstance(e, Exception):
                reason = f"{type(e).__name__}: {e}"
                with open(failed, "w") as f:
                    json.dump({"at": time.time(), "reason": reason}, f)
                raise TemplateUnavailable(f"building it failed: {reason}") from e
            raise
        log.info("VM template %s built in %.2f s: %s", k, stats.get("build_seconds", 0.0), d)
        return Template(k, d, shape)
    finally:
        os.close(fd)


def prune(top: str = "", accel: qemu.Accel | None = None) -> list[str]:
    """Remove the templates no shape can key to any more (their kernel, initramfs or qemu is
    gone or was rebuilt: an earlier guest layer or image), and failure records past their retry
    time.
    For ``podshim vm-image``, never the shim.  Clones running from a removed template keep the
    pages they map.  Returns what was removed."""
    top = top or root()
    removed: list[str] = []
    try:
        names = os.listdir(top)
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(top, name)
        if name.endswith(".failed"):
            if not _failure(path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    removed.append(path)
            continue
        if name.startswith(".") or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, META_FILE)) as f:
                shape = Shape(**json.load(f)["shape"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being built, or not ours: left alone
        try:
            if key(shape, accel or qemu.detect_accel()) == name:
                continue
        except TemplateUnavailable:
            pass  # its kernel or initramfs is gone
        aside = f"{path}.stale-{os.getpid()}-{time.monotonic_ns()}"
        with contextlib.suppress(OSError):
            os.rename(path, aside)
            shutil.rmtree(aside, ignore_errors=True)
            removed.append(path)
    return removed


def invalidate(t: Template, why: str) -> None:
    """A template that could not be restored: rename it away and unlink it, never rewrite it
    (running clones keep the pages they map), so that the next pod builds a new one."""
    log.warning("VM template %s is unusable (%s): removing it", t.key, why)
    aside = f"{t.dir}.stale-{os.getpid()}-{time.monotonic_ns()}"
    with contextlib.suppress(OSError):
        os.rename(t.dir, aside)
        shutil.rmtree(aside, ignore_errors=True)


def _sync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


async def build(shape: Shape, work: str, k: str) -> dict[str, float]:
    """Boot a template VM with its RAM in ``work``, wait for its idle agent, save its state."""
    t0 = time.monotonic()
    deadline = t0 + BUILD_TIMEOUT
    run_dir = qemu.run_dir_for(f"template-{k[:16]}-{os.getpid()}")
    qemu.remove_run_dir(run_dir)
    memory, state = os.path.join(work, MEMORY_FILE), os.path.join(work, STATE_FILE)
    vm = qemu.QemuVM(shape.config(TEMPLATE_NAME, run_dir, qemu.Boot.TEMPLATE, memory, state))
    slot = qemu.boot_slot()
    try:
        await asyncio.wait_for(slot.acquire(), BUILD_TIMEOUT)
        try:
            t_boot = time.monotonic()
            vm.spawn()
            await vm.wait_socket(deadline)
            client = AgentClient(vm.cfg.agent_socket, lambda _ev: None)
            try:
                await client.connect(max(1.0, deadline - time.monotonic()))
                await client.call("ping")
            finally:
                await client.close()  # clones open sessions of their own
            t_ready = time.monotonic()
            await vm.save(deadline)
            t_saved = time.monotonic()
        finally:
            slot.release()
    finally:
        await vm.close()
    # The guest's RAM (hundreds of MiB) to disk: seconds on a slow disk, never on the loop.
    await off_loop(_sync_file, os.path.join(work, MEMORY_FILE))
    st = os.stat(os.path.join(work, MEMORY_FILE))
    return {
        "build_seconds": round(time.monotonic() - t0, 3),
        "boot_seconds": round(t_ready - t_boot, 3),
        "save_seconds": round(t_saved - t_ready, 3),
        "memory_file_bytes": st.st_blocks * 512,
        "state_file_bytes": os.path.getsize(os.path.join(work, STATE_FILE)),
    }
