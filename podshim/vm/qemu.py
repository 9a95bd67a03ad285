"""One pod VM: a qemu process, its run dir and its shares.

Machine: ``-M microvm`` booting the ELF ``vmlinux`` through PVH, virtio-mmio devices only.
Accelerator: KVM where the host CPU has real virtualisation, TCG otherwise (:func:`detect_accel`).
Devices:

* a virtio-serial port named ``podshim.agent`` on a unix-socket chardev: the agent channel
  (the only transport this build has; AF_VSOCK would slot in beside it on hosts with
  vhost-vsock, which the machines we test on lack);
* one 9p export: the pod's rw share, into which the backend bind-mounts each container's rootfs
  and mounts.  The guest's userland (python, the agent, runc) is in its initramfs
  (:mod:`podshim.vm.layer`), not on the host;
* a virtio-net device, on a tap in the pod's network namespace when the pod has a network, and
  unplugged otherwise: the device set is the same for every pod, so one template serves all.

Three ways to start (:class:`Boot`): a cold boot of the kernel; a *template* boot, whose RAM is a
shared file that :mod:`podshim.vm.template` saves once the agent is idle; and a *clone*, which
maps that file privately (copy on write) and resumes from the template's device state instead
of booting (``-incoming defer``, then ``migrate-incoming`` over QMP).

qemu runs as our child through the shim's reaper, with ``PR_SET_PDEATHSIG`` so that even a
SIGKILLed shim leaves no VM behind.  Boots are limited across every shim on the host by a few
``flock``ed slot files: a TCG boot is CPU-bound, and many at once only make all of them late.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

from podshim.system import mounts, reaper
from podshim.vm import image as vmimage
from podshim.vm import layer as vmlayer
from podshim.vm.console import ConsoleLog
from podshim.vm.qmp import QMP, QMPError
from podshim.vm.share import stage_dir

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
RUN_ROOT_ENV = "PODSHIM_VM_RUN_DIR"
DEFAULT_RUN_ROOT = "/run/podshim/vm"
ACCEL_ENV = "PODSHIM_VM_ACCEL"
BOOT_SLOTS_ENV = "PODSHIM_VM_BOOT_SLOTS"
DEFAULT_BOOT_SLOTS = 2
AGENT_PORT = "podshim.agent"
# The translation cache per VM under TCG (qemu's default is far larger).  It is all resident within
# seconds of a clone's start: 24 MiB keeps 3 idle clones under 64 MiB PSS each; 32 starts a pod's
# first container some 0.15-0.2 s faster for 8 MiB more a pod; 16 makes python up to 3x slower.
TCG_TB_SIZE_MIB = 24
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


class VMError(Exception):
    """The VM could not be started or has gone; the message says why."""


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" | "tcg"
    reason: str


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def detect_accel(
    cpuinfo: str | None = None, dev_kvm: str = "/dev/kvm", sys_module: str = "/sys/module"
) -> Accel:
    """KVM only where it can run a stock kernel: a vmx/svm CPU flag and a usable /dev/kvm.

    /dev/kvm alone is not enough: a PVM host (kvm_pvm loaded, no vmx/svm, as on the machines
    this was developed on) offers /dev/kvm but runs only PVM-patched guest kernels; Debian's
    kernel dies there in emulation failures.  ``$PODSHIM_VM_ACCEL`` forces a choice."""
    forced = os.environ.get(ACCEL_ENV, "")
    if forced in ("kvm", "tcg"):
        return Accel(forced, f"${ACCEL_ENV}={forced}")
    if not os.path.exists(dev_kvm):
        return Accel("tcg", f"{dev_kvm} does not exist")
    if not os.access(dev_kvm, os.R_OK | os.W_OK):
        return Accel("tcg", f"{dev_kvm} is not usable by this user")
    if os.path.isdir(os.path.join(sys_module, "kvm_pvm")):
        return Accel("tcg", "kvm_pvm is loaded: this /dev/kvm runs no stock guest kernel")
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    flags = _cpu_flags(cpuinfo)
    if not flags & {"vmx", "svm"}:
        return Accel("tcg", "the CPU has no vmx or svm flag")
    return Accel("kvm", "vmx/svm and /dev/kvm")


def host_tsc_khz(cpuinfo: str | None = None) -> int:
    """Under TCG the guest reads the host TSC; telling it the rate skips PIT calibration, which on
    microvm under TCG sometimes fails and hangs the boot."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return 0
    for line in cpuinfo.splitlines():
        if line.startswith("cpu MHz"):
            with contextlib.suppress(ValueError):
                return int(float(line.partition(":")[2]) * 1000)
    return 0


@dataclass(frozen=True)
class Tap:
    """A tap device (already in the netns qemu starts in) and the MAC the guest's eth0 takes."""

    ifname: str
    mac: str


class Boot(Enum):
    COLD = "cold"
    TEMPLATE = "template"  # a cold boot whose RAM is a shared file, to be saved
    CLONE = "clone"  # resumes from a saved template, its RAM the template's file, privately


@dataclass(frozen=True)
class VMConfig:
    name: str
    memory_mib: int
    vcpus: int
    kernel: str
    initrd: str
    run_dir: str
    tb_size_mib: int = 0  # TCG only; 0: TCG_TB_SIZE_MIB
    netns: str = ""
    tap: Tap | None = None
    faults: bool = False
    boot: Boot = Boot.COLD
    memory_file: str = ""  # TEMPLATE and CLONE: the template's RAM
    state_file: str = ""  # CLONE: the template's device state; TEMPLATE: where it is saved

    @property
    def agent_socket(self) -> str:
        return os.path.join(self.run_dir, "agent.sock")

    @property
    def qmp_socket(self) -> str:
        return os.path.join(self.run_dir, "qmp.sock")

    @property
    def shared_dir(self) -> str:
        return os.path.join(self.run_dir, "shared")

    @property
    def console_log(self) -> str:
        return os.path.join(self.run_dir, "console.log")


def kernel_cmdline(accel: Accel, tsc_khz: int, faults: bool = False) -> str:
    parts = [
        "console=ttyS0",
        "panic=-1",  # with -no-reboot: an agent (PID 1) crash ends qemu
        # A triple fault: a restored clone ignores the ACPI reset (its guest lands in the
        # firmware and halts there), so -no-reboot would never end its qemu.
        "reboot=t",
        "quiet",
        "cryptomgr.notests",
        "random.trust_cpu=on",
        "tsc=reliable",
        "no_timer_check",
        "8250.nr_uarts=1",
        "audit=0",
        "apparmor=0",
        "lsm=capability",
        f"rdinit={vmlayer.INIT}",
    ]
    if accel.name == "tcg":
        if tsc_khz:
            parts.append(f"tsc_early_khz={tsc_khz}")
        # TCG does not emulate speculative execution, so the mitigations only cost boot time.
        parts.append("mitigations=off")
    if faults:
        parts.append("podshim.faults=1")
    return " ".join(parts)


# Once the machine is built, qemu runs under its seccomp filter: no obsolete syscalls, no setuid
# or capability changes, no fork/exec (it spawns no helper: the tap is opened with script=no),
# no scheduler or resource-limit changes.  Beside it: -nodefaults (no default NIC, monitor,
# serial or parallel port, no -netdev user), -no-user-config, and no monitor but, for templates and
# clones, a QMP socket in the run dir (the migration's control; the guest cannot reach it).
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def hardening_args() -> list[str]:
    return ["-sandbox", SANDBOX]


TEMPLATE_MAC = "02:00:00:00:00:01"  # the guest keeps it after a restore until setup changes it


def qemu_argv(cfg: VMConfig, accel: Accel, tsc_khz: int) -> list[str]:
    machine = "microvm"
    if cfg.boot is not Boot.COLD:
        machine += ",memory-backend=mem"
    argv = [QEMU, "-name", cfg.name, "-M", machine]
    if accel.name == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", f"tcg,tb-size={cfg.tb_size_mib or TCG_TB_SIZE_MIB}"]
    argv += [
        "-m", f"{cfg.memory_mib}M",
        "-smp", str(cfg.vcpus),
        *hardening_args(),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", "stdio",
    ]  # fmt: skip
    if cfg.boot is not Boot.COLD:
        # share=on: the template's guest writes its RAM into the file; share=off: a clone maps
        # it privately, so its writes are copies of its own and the file never changes.
        share = "on" if cfg.boot is Boot.TEMPLATE else "off"
        argv += [
            "-object",
            f"memory-backend-file,id=mem,size={cfg.memory_mib}M,mem-path={cfg.memory_file},share={share}",
            "-qmp", f"unix:{cfg.qmp_socket},server=on,wait=off",
        ]  # fmt: skip
    if cfg.boot is Boot.CLONE:
        argv += ["-incoming", "defer"]
    else:
        argv += [
            "-kernel",
            cfg.kernel,
            "-initrd",
            cfg.initrd,
            "-append",
            kernel_cmdline(accel, tsc_khz, cfg.faults),
        ]
    net = f"virtio-net-device,id=nic0,mac={cfg.tap.mac if cfg.tap else TEMPLATE_MAC}"
    if cfg.tap is not None:
        argv += ["-netdev", f"tap,id=net0,ifname={cfg.tap.ifname},script=no,downscript=no"]
        net += ",netdev=net0"
    argv += [
        # remap: the share holds bind mounts of other filesystems (rootfs overlays, files).
        "-fsdev", f"local,id=shared,path={cfg.shared_dir},security_model=none,multidevs=remap",
        "-device", f"virtio-9p-device,fsdev=shared,mount_tag={vmimage.TAG_SHARED}",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={cfg.agent_socket},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}",
        "-device", net,
    ]  # fmt: skip
    return argv


def run_root() -> str:
    return os.environ.get(RUN_ROOT_ENV) or DEFAULT_RUN_ROOT


def run_dir_for(key: str, root: str = "") -> str:
    """The run dir of a pod's VM (its shim's grouping key: the sandbox id).  Hashed when the agent
    socket in it would not fit sun_path."""
    root = root or run_root()
    name = key
    if len(os.path.join(root, name, "agent.sock")) > 107:
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
    return os.path.join(root, name)


def clean_up_after_shim(key: str, container_id: str, shim_gone: bool = False) -> None:
    """For the shim's ``delete`` action: remove what a dead shim left of one container in its pod
    VM's share, and, once the pod's shim is gone, its qemu and the whole run dir.  qemu dies with
    its shim through PDEATHSIG, but maybe not yet when containerd runs this (a TCG guest with
    hundreds of MiB takes a moment to tear down): it is killed again and awaited, bounded.
    Cheap when there is nothing to do."""
    run_dir = run_dir_for(key)
    if not os.path.isdir(run_dir):
        return
    share = os.path.join(stage_dir(run_dir), container_id)
    if os.path.exists(share):
        with contextlib.suppress(OSError):
            mounts.unmount_all(share)
        shutil.rmtree(share, ignore_errors=True)
    if shim_gone:
        _kill_qemu(run_dir)
    if not _qemu_alive(run_dir):
        remove_run_dir(run_dir)


def _qemu_pidfd(run_dir: str) -> int | None:
    """A pidfd of the run dir's qemu, if it still runs (a pidfd: its pid cannot be reused under us)."""
    try:
        with open(os.path.join(run_dir, "qemu.pid")) as f:
            pid = int(f.read().strip())
        fd = os.pidfd_open(pid)
    except (OSError, ValueError):
        return None
    try:
        if os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("qemu-system"):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _kill_qemu(run_dir: str, timeout: float = 3.0) -> None:
    import select

    fd = _qemu_pidfd(run_dir)
    if fd is None:
        return
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        # Readable once it has exited; its parent (init, now) reaps it.
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


def _qemu_alive(run_dir: str) -> bool:
    fd = _qemu_pidfd(run_dir)
    if fd is None:
        return False
    os.close(fd)
    return True


# -- boot slots ---------------------------------------------------------------------------------


class BootSlot:
    """One of N host-wide boot slots: an flock on ``<run root>/boot-slots/<i>``.  The kernel drops
    the lock when its holder dies, so a crashed shim never keeps a slot."""

    def __init__(self, root: str, slots: int) -> None:
        self.dir = os.path.join(root, "boot-slots")
        self.slots = max(1, slots)
        self.fd = -1

    async def acquire(self, poll: float = 0.05) -> None:
        os.makedirs(self.dir, exist_ok=True)
        while True:
            for i in range(self.slots):
                fd = os.open(os.path.join(self.dir, str(i)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    os.close(fd)
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    continue
                self.fd = fd
                return
            await asyncio.sleep(poll)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def boot_slot(root: str = "") -> BootSlot:
    """A slot among ``$PODSHIM_VM_BOOT_SLOTS`` (default 2) under the run root."""
    return BootSlot(root or run_root(), int(os.environ.get(BOOT_SLOTS_ENV) or DEFAULT_BOOT_SLOTS))


# -- the VM -------------------------------------------------------------------------------------


def _enter_netns_and_die_with_parent(netns_fd: int) -> Callable[[], None]:
    def preexec() -> None:
        # Runs in the forked child before exec: qemu dies with the shim, and opens its tap in
        # the pod's network namespace (a tap can only be opened by name from inside it).
        if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(121)
        if netns_fd >= 0 and _libc.setns(netns_fd, 0x40000000) != 0:  # CLONE_NEWNET
            os._exit(122)

    return preexec


class QemuVM:
    def __init__(self, cfg: VMConfig) -> None:
        self.cfg = cfg
        self.accel = detect_accel()
        self.pid = 0
        self.started_at = 0.0
        self.exit_status: int | None = None
        self._exited: asyncio.Future[reaper.Exit] | None = None
        self._on_exit: list[Callable[[int], None]] = []
        self._console: ConsoleLog | None = None
        self._closed = False

    @property
    def alive(self) -> bool:
        return self.pid != 0 and self.exit_status is None

    def on_exit(self, callback: Callable[[int], None]) -> None:
        """Call back once with qemu's exit status when it exits (not when close() kills it)."""
        self._on_exit.append(callback)

    def spawn(self) -> None:
        cfg = self.cfg
        os.makedirs(cfg.shared_dir, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(cfg.agent_socket)
        argv = qemu_argv(cfg, self.accel, host_tsc_khz() if self.accel.name == "tcg" else 0)
        if shutil.which(QEMU) is None:
            raise VMError(f"{QEMU} not found: apt-get install qemu-system-x86")
        console_r, console = os.pipe2(os.O_CLOEXEC)  # the guest's console, kept within a bound
        self._console = ConsoleLog(console_r, cfg.console_log)
        netns_fd = os.open(cfg.netns, os.O_RDONLY | os.O_CLOEXEC) if cfg.netns else -1
        try:
            self.started_at = time.monotonic()
            proc, self._exited = reaper.spawn(
                argv,
                stdout=console,
                stderr=console,
                start_new_session=True,
                preexec_fn=_enter_netns_and_die_with_parent(netns_fd),
            )
        except BaseException:
            self._console.close()
            raise
        finally:
            os.close(console)
            if netns_fd >= 0:
                os.close(netns_fd)

        self.pid = proc.pid
        self._exited.add_done_callback(self._qemu_exited)
        with open(os.path.join(cfg.run_dir, "qemu.pid"), "w") as f:
            f.write(str(self.pid))
        log.info("pod VM %s: qemu pid %d (%s: %s)", cfg.name, self.pid, self.accel.name, self.accel.reason)

    def _qemu_exited(self, fut: asyncio.Future[reaper.Exit]) -> None:
        self.exit_status = fut.result().status if not fut.cancelled() else -1
        if self._closed:
            return
        log.warning(
            "pod VM %s: qemu exited with status %s\n%s", self.cfg.name, self.exit_status, self.console_tail()
        )
        for cb in self._on_exit:
            cb(self.exit_status)

    async def wait_socket(self, deadline: float) -> None:
        """qemu creates the chardev socket right after exec; wait for it or for qemu's exit."""
        while not os.path.exists(self.cfg.agent_socket):
            if not self.alive:
                raise VMError(f"qemu exited with status {self.exit_status}: {self.console_tail()}")
            if time.monotonic() > deadline:
                raise VMError("qemu did not create its agent socket")
            await asyncio.sleep(0.01)

    async def _qmp(self, deadline: float) -> QMP:
        try:
            return await QMP.connect(self.cfg.qmp_socket, max(0.1, deadline - time.monotonic()))
        except (QMPError, OSError) as e:
            raise VMError(f"qemu's control socket: {e}: {self.console_tail()}") from e

    async def _migration(self, qmp: QMP, incoming: bool) -> None:
        """Start the migration to or from the config's state file.  qemu gets the file as a
        descriptor (``getfd``): its sandbox denies the helper process an ``exec:`` URI needs."""
        if incoming:
            fd = os.open(self.cfg.state_file, os.O_RDONLY | os.O_CLOEXEC)
        else:
            fd = os.open(self.cfg.state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await qmp.execute("getfd", fd=fd, fdname="state")
        finally:
            os.close(fd)  # qemu holds its own now
        # Shared RAM (the template's file) is not sent: the state is the devices and CPUs only.
        caps = [{"capability": "x-ignore-shared", "state": True}]
        await qmp.execute("migrate-set-capabilities", capabilities=caps)
        await qmp.execute("migrate-incoming" if incoming else "migrate", uri="fd:state")

    async def restore(self, deadline: float) -> None:
        """CLONE: load the template's device state; the guest resumes by itself once loaded.  A
        state qemu cannot load makes it exit, which is a VMError here."""

        async def running(qmp: QMP) -> bool:
            return bool((await qmp.execute("query-status")).get("status") == "running")

        await self._migrate(deadline, True, running, "the clone's restore")

    async def save(self, deadline: float) -> None:
        """TEMPLATE: write the device state to the config's state file; the guest stays paused."""

        async def saved(qmp: QMP) -> bool:
            info = await qmp.execute("query-migrate")
            if info.get("status") in ("failed", "cancelled"):
                raise VMError(f"saving the template failed: {info.get('error-desc') or info.get('status')}")
            return bool(info.get("status") == "completed")

        await self._migrate(deadline, False, saved, "the template's save")

    async def _migrate(
        self, deadline: float, incoming: bool, done: Callable[[QMP], Awaitable[bool]], what: str
    ) -> None:
        """The migration in or out, then ``done`` polled until true or the deadline."""
        qmp = await self._qmp(deadline)
        try:
            await self._migration(qmp, incoming)
            await _until(lambda: done(qmp), deadline, what)
        except (QMPError, OSError) as e:
            tail = f": {self.console_tail()}" if incoming else ""
            raise VMError(f"cannot {'restore from' if incoming else 'save'} the template: {e}{tail}") from e
        finally:
            qmp.close()

    def console_tail(self, limit: int = 2000) -> str:
        if self._console is not None:
            with contextlib.suppress(OSError):
                self._console.pump()  # what qemu wrote just before it exited
        try:
            with open(self.cfg.console_log, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - limit))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def memory(self) -> dict[str, int]:
        """qemu's RSS and PSS in bytes (0 when unknown)."""
        out = {"rss": 0, "pss": 0}
        if not self.alive:
            return out
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    out[key.lower()] = int(rest.split()[0]) * 1024
        return out

    async def close(self) -> None:
        """Kill qemu, reap it, remove the run dir.  Idempotent; the caller unmounted its shares."""
        if self._closed:
            return
        self._closed = True
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self._exited is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._exited)
        if self._console is not None:
            await asyncio.wait([self._console.task], timeout=2)  # EOF follows qemu's exit
            self._console.close()
        remove_run_dir(self.cfg.run_dir)


async def _until(done: Callable[[], Awaitable[bool]], deadline: float, what: str) -> None:
    while not await done():
        if time.monotonic() > deadline:
            raise VMError(f"{what} did not finish in time")
        await asyncio.sleep(0.005)


def remove_run_dir(run_dir: str) -> None:
    """Unmount whatever is still mounted below the run dir, then remove it."""
    with contextlib.suppress(FileNotFoundError):
        mounts.unmount_all(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
