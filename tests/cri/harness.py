"""A private containerd with its CRI plugin, confined to a network namespace of its own.

Built on the e2e harness's PrivateContainerd (root, state, sockets and log under one temp dir, in
the session's private mount namespace with a private /run).  On top of that:

  * containerd, and so every CNI plugin it runs and the bridge they create, lives in a network
    namespace made for the suite (`NetNs`): the host's network is never touched;
  * CNI: bridge + host-local + loopback from /usr/lib/cni, its conf dir and IPAM data under the
    temp dir, netns mounts under the state dir (`netns_mounts_under_state_dir`);
  * libcni's result cache is hard-wired to /var/lib/cni, so /var/lib is overlaid (in the private
    mount namespace only) with a writable layer under the temp dir: the host's /var/lib stays as
    it is (`VarLibOverlay`);
  * three runtime handlers: `runc` (the reference), `podshim`, and `podshim-host`, the admin's
    handler for host-process pods, with the options file `podshim install` writes for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from harness import leaks
from harness.containerd import PrivateContainerd, _toml_str, private_run_dir

from podshim.cli import install as installing

CRI_NAMESPACE = "k8s.io"
RUNC_HANDLER = "runc"
PODSHIM_HANDLER = "podshim"
HOST_HANDLER = "podshim-host"  # not in HANDLERS: those run the same tests side by side
# podshim with `vm.template = false` in its options file: VM pods boot cold (the bench's baseline).
PODSHIM_COLD_HANDLER = "podshim-cold-vm"
HANDLERS = (PODSHIM_HANDLER, RUNC_HANDLER)
SHIM_BINARIES = {
    RUNC_HANDLER: "containerd-shim-runc-v2",
    PODSHIM_HANDLER: "containerd-shim-podshim-v1",
    HOST_HANDLER: "containerd-shim-podshim-v1",
    PODSHIM_COLD_HANDLER: "containerd-shim-podshim-v1",
}
ANNOTATION_GLOB = "podshim.io/*"
CNI_NETWORK = "podshim-cri"
CNI_BRIDGE = "pshcri0"
CNI_SUBNET = "10.231.0.0/24"

_CLONE_NEWNET = 0x40000000
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)

# Plugins CRI does not need (on top of PrivateContainerd's list).  io.containerd.runtime.v1.linux must
# stay: 1.6's tasks service, which CRI needs, refuses to load without it.
EXTRA_DISABLED = (
    "io.containerd.snapshotter.v1.native",
    "io.containerd.internal.v1.tracing",
)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class NetNs:
    """A persistent network namespace bound to a file (like `ip netns add`, but under our dir)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def create(self) -> None:
        self.path.touch()
        # unshare bind-mounts the new namespace onto the file; lo must be up for CRI's stream
        # server (127.0.0.1) and for anything else containerd does on localhost.
        subprocess.run(
            ["unshare", f"--net={self.path}", "ip", "link", "set", "lo", "up"],
            check=True,
            capture_output=True,
            timeout=30,
        )

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Move the calling thread into the namespace; processes it starts stay there."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        target = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.setns(target, _CLONE_NEWNET), f"setns({self.path})")
            try:
                yield
            finally:
                _check(_libc.setns(own, _CLONE_NEWNET), "setns(back)")
        finally:
            os.close(target)
            os.close(own)

    def run(self, *argv: str) -> str:
        res = subprocess.run(
            ["nsenter", f"--net={self.path}", *argv], capture_output=True, text=True, timeout=30, check=False
        )
        if res.returncode != 0:
            raise RuntimeError(f"in netns {self.path}: {' '.join(argv)}: rc={res.returncode} {res.stderr}")
        return res.stdout

    def links(self, kind: str = "") -> frozenset[str]:
        """Names of the links in the namespace (optionally only one `ip link` type, e.g. veth)."""
        out = self.run("ip", "-json", "link", "show", *(("type", kind) if kind else ()))
        return frozenset(str(link["ifname"]) for link in json.loads(out or "[]"))

    def remove(self) -> None:
        if self.path.exists():
            _libc.umount2(str(self.path).encode(), _MNT_DETACH)
            self.path.unlink(missing_ok=True)


class VarLibOverlay:
    """/var/lib overlaid with a writable layer under `base`, in this (private) mount namespace.

    libcni caches every ADD result under /var/lib/cni with no way to configure that from
    containerd 1.6; the overlay keeps those writes, and any other, off the host's disk.
    """

    TARGET = Path("/var/lib")

    def __init__(self, base: Path) -> None:
        self.upper = base / "upper"
        self.work = base / "work"
        self.mounted = False

    def mount(self) -> None:
        if private_run_dir() is None:  # the sign of the test session's private mount namespace
            raise RuntimeError("refusing to overlay /var/lib outside the tests' private mount namespace")
        self.upper.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        opts = f"lowerdir={self.TARGET},upperdir={self.upper},workdir={self.work}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(self.TARGET)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self.mounted = True

    def unmount(self) -> None:
        if self.mounted:
            _libc.umount2(str(self.TARGET).encode(), _MNT_DETACH)
            self.mounted = False


def cni_conflist(ipam_dir: Path) -> dict[str, object]:
    return {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": CNI_BRIDGE,
                "isGateway": True,
                "ipMasq": False,  # no iptables: nothing leaves the namespace anyway
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": CNI_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(ipam_dir),
                },
            },
            {"type": "loopback"},
        ],
    }


def cri_config(
    *,
    sandbox_image: str,
    cni_conf_dir: Path,
    host_options: Path,
    cold_vm_options: Path,
    cni_bin_dir: Path = Path("/usr/lib/cni"),
) -> str:
    cri = '[plugins."io.containerd.grpc.v1.cri"]'
    ctd = '[plugins."io.containerd.grpc.v1.cri".containerd'
    globs = f"[{_toml_str(ANNOTATION_GLOB)}]"
    return "\n".join(
        [
            cri,
            f"  sandbox_image = {_toml_str(sandbox_image)}",
            # Needed where containerd itself may not lower oom_score_adj (-998 would be refused).
            "  restrict_oom_score_adj = true",
            "  netns_mounts_under_state_dir = true",
            "  disable_tcp_service = true",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "  enable_selinux = false",
            "  disable_apparmor = true",
            "  stats_collect_period = 60",
            f"{ctd}]",
            '  snapshotter = "overlayfs"',
            f'  default_runtime_name = "{RUNC_HANDLER}"',
            f"{ctd}.runtimes.{RUNC_HANDLER}]",
            '  runtime_type = "io.containerd.runc.v2"',
            f"  pod_annotations = {globs}",  # the same as podshim's: the reference sees the same specs
            f"  container_annotations = {globs}",
            f"{ctd}.runtimes.{PODSHIM_HANDLER}]",
            '  runtime_type = "io.containerd.podshim.v1"',
            f"  pod_annotations = {globs}",
            f"  container_annotations = {globs}",
            installing.handler_stanza(HOST_HANDLER, str(host_options)).rstrip("\n"),
            installing.handler_stanza(PODSHIM_COLD_HANDLER, str(cold_vm_options)).rstrip("\n"),
            f"{cri[:-1]}.cni]",
            f"  bin_dir = {_toml_str(str(cni_bin_dir))}",
            f"  conf_dir = {_toml_str(str(cni_conf_dir))}",
            "  max_conf_num = 1",
            "",
        ]
    )


class CriContainerd(PrivateContainerd):
    """PrivateContainerd with CRI enabled, started inside `netns` (created and removed by us)."""

    def __init__(self, base: Path, *, sandbox_image: str) -> None:
        self.netns = NetNs(base / "netns")
        self.cni_conf_dir = base / "cni" / "net.d"
        self.cni_ipam_dir = base / "cni" / "ipam"
        self.pod_log_root = base / "pod-logs"
        self.host_options = base / "options" / f"{HOST_HANDLER}.toml"
        self.host_rootfs_locations = base / "hostprocess"  # what host pods may ask for
        self.cold_vm_options = base / "options" / f"{PODSHIM_COLD_HANDLER}.toml"
        super().__init__(
            base,
            enable_cri=True,
            extra_config=cri_config(
                sandbox_image=sandbox_image,
                cni_conf_dir=self.cni_conf_dir,
                host_options=self.host_options,
                cold_vm_options=self.cold_vm_options,
            ),
        )

    def bundle(self, task_id: str) -> Path:
        return self.state / "io.containerd.runtime.v2.task" / CRI_NAMESPACE / task_id

    def disabled_plugins(self) -> list[str]:
        return [*super().disabled_plugins(), *EXTRA_DISABLED]

    def prepare(self) -> None:
        """Network namespace and CNI configuration; before the first start()."""
        if not self.netns.path.exists():
            self.netns.create()
        self.cni_conf_dir.mkdir(parents=True, exist_ok=True)
        self.cni_ipam_dir.mkdir(parents=True, exist_ok=True)
        self.pod_log_root.mkdir(parents=True, exist_ok=True)
        conf = self.cni_conf_dir / f"10-{CNI_NETWORK}.conflist"
        conf.write_text(json.dumps(cni_conflist(self.cni_ipam_dir), indent=2))
        self.host_options.parent.mkdir(parents=True, exist_ok=True)
        handler = installing.host_handler(HOST_HANDLER, (str(self.host_rootfs_locations),))
        self.host_options.write_text(handler.options)
        self.cold_vm_options.write_text("[vm]\ntemplate = false\n")

    def start(self, timeout: float = 30.0) -> None:
        self.prepare()
        # containerd inherits the thread's network namespace when it is forked.
        with self.netns.entered():
            super().start(timeout)

    def close(self) -> None:
        self.stop()
        self.netns.remove()
        super().close()

    # -- what CNI allocated, for the leak checks --------------------------------------------------

    def ip_allocations(self) -> frozenset[str]:
        """host-local's reservation files (one per allocated address)."""
        d = self.cni_ipam_dir / CNI_NETWORK
        if not d.is_dir():
            return frozenset()
        return frozenset(p.name for p in d.iterdir() if p.name[:1].isdigit())

    def veths(self) -> frozenset[str]:
        return self.netns.links("veth")


# -- leak checks: the e2e snapshot plus what CRI and CNI hold -------------------------------------


@dataclasses.dataclass(frozen=True)
class CriSnapshot:
    core: leaks.Snapshot
    veths: frozenset[str] = frozenset()
    ip_allocations: frozenset[str] = frozenset()
    cri_objects: frozenset[str] = frozenset()  # "pod <id>" / "container <id>" still known to CRI

    def __bool__(self) -> bool:
        return bool(self.core or self.veths or self.ip_allocations or self.cri_objects)

    def minus(self, other: CriSnapshot) -> CriSnapshot:
        return CriSnapshot(
            core=self.core.minus(other.core),
            veths=self.veths - other.veths,
            ip_allocations=self.ip_allocations - other.ip_allocations,
            cri_objects=self.cri_objects - other.cri_objects,
        )

    def describe(self) -> str:
        lines = [self.core.describe()] if self.core else []
        for name in ("veths", "ip_allocations", "cri_objects"):
            items: frozenset[str] = getattr(self, name)
            if items:
                lines.append(f"{name}:")
                lines.extend(f"  {x}" for x in sorted(items))
        return "\n".join(lines) or "(nothing)"


def pod_cgroups(cgroup_prefix: str) -> frozenset[str]:
    """The cgroup dirs of pods and containers under the session's cgroup parents.

    The parents themselves (/<prefix><n>, given to pods as cgroup_parent) are made by runc and
    never removed by anyone, like ctr's namespace dirs in the e2e suite: not a leak.
    """
    return frozenset(
        p for p in leaks.session_cgroups(cgroup_prefix) if Path(p).parent.parent != leaks.CGROUP_ROOT
    )


def take(cd: CriContainerd, *, cgroup_prefix: str, cri_objects: frozenset[str]) -> CriSnapshot:
    core = leaks.take(
        base=cd.base,
        state=cd.state,
        cgroup_prefix=cgroup_prefix,
        ignore_pids=[p for p in (cd.pid,) if p is not None],
    )
    core = dataclasses.replace(core, cgroups=pod_cgroups(cgroup_prefix))
    return CriSnapshot(
        core=core, veths=cd.veths(), ip_allocations=cd.ip_allocations(), cri_objects=cri_objects
    )


def reclaim(cd: CriContainerd, leaked: CriSnapshot) -> None:
    """Undo a leak (after the CRI objects were removed through CRI): processes, mounts, cgroups,
    veths and address reservations."""
    leaks.reclaim(leaked.core)
    for veth in leaked.veths:
        with contextlib.suppress(RuntimeError):
            cd.netns.run("ip", "link", "del", veth)
    for ip in leaked.ip_allocations:
        (cd.cni_ipam_dir / CNI_NETWORK / ip).unlink(missing_ok=True)


def remove_cgroup_parents(cgroup_prefix: str) -> None:
    leaks.remove_empty_cgroups(leaks.session_cgroups(cgroup_prefix))


# -- processes -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShimProcess:
    pid: int
    argv: tuple[str, ...]


def shim_servers(binary: str, task_id: str) -> list[ShimProcess]:
    """Live `binary` processes started for `task_id` (`-id <task_id>`), other than `delete` runs.

    The runc shim re-executes itself as the server; podshim's `start` forks it (same argv, with
    `start`), and the `start` process has exited once containerd has the task.  A Python shim runs
    as `python …/containerd-shim-podshim-v1 …`, hence the look at the first two arguments.
    """
    found: list[ShimProcess] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = tuple(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
            state = _stat(int(entry))[0]
        except (OSError, IndexError):
            continue
        if state in ("Z", "X") or not any(os.path.basename(a) == binary for a in argv[:2]):
            continue
        if "-id" in argv[:-1] and argv[argv.index("-id") + 1] == task_id and "delete" not in argv:
            found.append(ShimProcess(int(entry), argv))
    return found


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    return raw[raw.rfind(")") + 2 :].split()


def parent_pid(pid: int) -> int:
    return int(_stat(pid)[1])


def net_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")
