"""The bench's world: one private CRI-enabled containerd, a ctr namespace and a CRI client.

`Env` is what every scenario gets. `BenchEnv` builds one from scratch for `python -m bench`
(inside the private mount namespace that scripts/bench.sh sets up); the smoke test builds one
from the CRI test fixtures instead, so that their leak guard checks what the bench leaves.

Everything the bench creates is recognisable by one prefix: the ctr namespace and the CRI pods'
cgroup parent are both `<prefix>1`, so ctr's default cgroup (`/<namespace>/<id>`) and the pods'
cgroups fall under the same `/sys/fs/cgroup/*/<prefix>1` tree that the leak checks look at.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc  # type: ignore[import-untyped]
from cri.client import CriClient
from cri.harness import (
    ANNOTATION_GLOB,
    CRI_NAMESPACE,
    PODSHIM_HANDLER,
    RUNC_HANDLER,
    SHIM_BINARIES,
    CriContainerd,
    VarLibOverlay,
    remove_cgroup_parents,
)
from cri.images import PAUSE_REF, build_pause_tarball
from harness import leaks
from harness.containerd import PODSHIM_BINARY, PODSHIM_COLD_DIR, VENV_BIN, private_run_dir
from harness.ctr import Ctr, cleanup_namespace
from harness.images import BUSYBOX_REF, build_busybox_tarball, import_image

from podshim.shim import zygote

# The runtimes, by their short names: ctr runtime type, CRI handler, shim binary. podshim runs as
# installed: the C entry point and the warm zygote. podshim-cold is its Python entry point alone,
# under a runtime name of its own so that one containerd runs both (BenchEnv installs it).
RUNC = "runc-v2"
PODSHIM = "podshim"
PODSHIM_COLD = "podshim-cold"
ORDER = (RUNC, PODSHIM)  # the interleaving order: A = the reference, B = podshim
WITH_COLD = (RUNC, PODSHIM, PODSHIM_COLD)  # A B C, where the cold path is shown too


@dataclass(frozen=True)
class Runtime:
    name: str
    runtime_type: str
    handler: str
    binary: str


RUNTIMES = {
    RUNC: Runtime(RUNC, "io.containerd.runc.v2", RUNC_HANDLER, SHIM_BINARIES[RUNC_HANDLER]),
    PODSHIM: Runtime(PODSHIM, "io.containerd.podshim.v1", PODSHIM_HANDLER, SHIM_BINARIES[PODSHIM_HANDLER]),
    PODSHIM_COLD: Runtime(
        PODSHIM_COLD, "io.containerd.podshimcold.v1", "podshim-cold", "containerd-shim-podshimcold-v1"
    ),
}
PYTHON_ENTRY = PODSHIM_COLD_DIR / PODSHIM_BINARY  # podshim's Python entry point (cold)


def install_cold_runtime(cd: CriContainerd, bin_dir: Path) -> None:
    """Before cd starts: podshim's Python entry point as runtime podshim-cold (ctr and CRI)."""
    rt = RUNTIMES[PODSHIM_COLD]
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / rt.binary).symlink_to(PYTHON_ENTRY)
    cd.extra_path.insert(0, bin_dir)
    globs = f'["{ANNOTATION_GLOB}"]'
    cd.extra_config += (
        f'\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{rt.handler}]\n'
        f'  runtime_type = "{rt.runtime_type}"\n'
        f"  pod_annotations = {globs}\n  container_annotations = {globs}\n"
    )


@dataclass
class Env:
    """What a scenario may use. `cri` creates pods under the prefix's cgroup parent."""

    cd: CriContainerd
    ctr: Ctr  # namespace `<prefix>1`, busybox imported
    cri: CriClient
    image: str = BUSYBOX_REF
    smoke: bool = False
    # Set by BenchEnv: the bench owns containerd and may restart it at another log level.
    can_restart: bool = False
    # Set by BenchEnv: containerd has the podshim-cold runtime too (install_cold_runtime).
    has_cold: bool = False
    notes: list[str] = field(default_factory=list)
    _warmups: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def compared(self) -> tuple[str, ...]:
        """The runtimes of the scenarios that show podshim warm and cold."""
        return WITH_COLD if self.has_cold else ORDER

    def warm_zygote(self) -> None:
        """Make sure podshim's zygote for this containerd is up and serving before podshim is
        measured warm: a container through podshim spawns it if there is none (a cold start
        does), then wait until the zygote answers."""
        rt = RUNTIMES[PODSHIM]
        name = f"zwarm-{next(self._warmups)}"
        self.ctr.check("run", "--rm", "--runtime", rt.runtime_type, self.image, name, "true")
        wait_for_zygote(self.cd.state)

    @property
    def scratch(self) -> Path:
        """The bench's own files (fake bundles, the bytecode copy, the what-ifs): one dir to remove."""
        return self.cd.base / "bench-scratch"

    @contextlib.contextmanager
    def log_level(self, level: str) -> Iterator[bool]:
        """Run the body with containerd (and so the shims it starts) at `level`.

        Yields whether the level is in force: a fixture-owned containerd is never restarted, so
        the body must cope with whatever level it has. Shims started before a restart keep the
        level they were started with (the `-debug` flag), so only tasks started inside count.
        """
        if self.cd.log_level == level:
            yield True
            return
        if not self.can_restart:
            yield False
            return
        previous = self.cd.log_level
        self.cd.log_level = level
        self.cd.restart()
        self._wait_cri()
        try:
            yield True
        finally:
            self.cd.log_level = previous
            self.cd.restart()
            self._wait_cri()

    def _wait_cri(self, timeout: float = 30.0) -> None:
        """After a restart the client's channel fails its first call (the old connection is gone)
        and CRI needs a moment to load: retry a cheap call until it answers."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.cri.version()
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def wait_for_zygote(state: Path, timeout: float = 60.0) -> None:
    """Wait until the zygote for containerd state dir `state` answers a request: its loop runs
    once it has loaded everything. Nothing to wait for without a C entry point."""
    entry = VENV_BIN / PODSHIM_BINARY
    with open(entry, "rb") as f:
        if f.read(4) != b"\x7fELF":
            return
    path = state / "s" / f"zygote-{zygote.key_of(str(entry))}"
    deadline = time.monotonic() + timeout
    while not _zygote_answers(str(path)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"podshim's zygote {path} did not come up within {timeout}s")
        time.sleep(0.1)


def _zygote_answers(path: str) -> bool:
    """The zygote says "A" to a connection once its loop runs, that is once it has loaded."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5.0)
    try:
        s.connect(path)
        return s.recv(1) == b"A"
    except OSError:
        return False
    finally:
        s.close()


def _wait_for_images(client: CriClient, refs: list[str], timeout: float = 15.0) -> None:
    # CRI learns about images imported with ctr from containerd's events, a moment later.
    deadline = time.monotonic() + timeout
    while missing := [r for r in refs if client.image_status(r) is None]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"CRI does not see the imported images {missing}")
        time.sleep(0.05)


class BenchEnv:
    """A private CRI containerd for a whole bench run, with its own temp dir and prefix.

    On exit it removes every pod and container through CRI and ctr, then reclaims whatever of its
    own is still running (by cgroup prefix and by containerd address in the argv), unmounts and
    deletes the temp dir, so that an interrupted run leaves nothing behind either.
    """

    def __init__(self, *, log_level: str = "info", smoke: bool = False) -> None:
        if private_run_dir() is None:
            raise RuntimeError(
                "refusing to start containerd: /run is not a private bind mount; "
                "run the bench through scripts/bench.sh (it uses scripts/in-private-run.sh)"
            )
        self.prefix = f"pbench{secrets.token_hex(3)}-"
        self.base = Path(tempfile.mkdtemp(prefix="podshim-bench-"))
        self.overlay = VarLibOverlay(self.base / "var-lib")
        self.cd = CriContainerd(self.base / "containerd", sandbox_image=PAUSE_REF)
        self.cd.log_level = log_level
        self.cd.loop_check = False  # the tests' debug check would be measured with the shim
        install_cold_runtime(self.cd, self.base / "cold-bin")
        self.smoke = smoke
        self.env: Env | None = None
        # Where close() copies containerd's log (with the shims' lines) before the dir goes.
        self.keep_log: Path | None = None

    def __enter__(self) -> Env:
        try:
            self.overlay.mount()
            self.cd.start()
            images = self.base / "images"
            busybox = build_busybox_tarball(images / "busybox.tar")
            namespace = f"{self.prefix}1"
            ctr = Ctr(self.cd.address, namespace, timeout=120.0)
            import_image(ctr, busybox)
            k8s = ctr.with_namespace(CRI_NAMESPACE)
            import_image(k8s, busybox)
            import_image(k8s, build_pause_tarball(images))
            cri = CriClient(self.cd.address, cgroup_parent=f"/{namespace}", log_root=self.cd.pod_log_root)
            cri.timeout = 120.0  # 100 pods on 2 cores: CRI calls queue up behind each other
            _wait_for_images(cri, [BUSYBOX_REF, PAUSE_REF])
        except BaseException:
            self.close()
            raise
        self.env = Env(cd=self.cd, ctr=ctr, cri=cri, smoke=self.smoke, can_restart=True, has_cold=True)
        return self.env

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        env = self.env
        if env is not None and self.cd.is_running():
            with contextlib.suppress(Exception):
                env.cri.force_remove_pods(env.cri.pods)
            with contextlib.suppress(Exception):
                cleanup_namespace(env.ctr)
            env.cri.close()
        self.cd.stop()
        if self.keep_log is not None and self.cd.log_path.exists():
            self.keep_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.cd.log_path, self.keep_log)
        ours = frozenset(
            p
            for p in leaks.session_processes(self.prefix)
            if p.kind == "container" or self.cd.address in p.cmdline or str(self.base) in p.cmdline
        )
        leaks.reclaim(leaks.Snapshot(processes=ours))
        self.cd.close()
        self.overlay.unmount()
        remove_cgroup_parents(self.prefix)
        shutil.rmtree(self.base, ignore_errors=True)


def shim_env(cd: CriContainerd) -> dict[str, str]:
    """The environment containerd gives a shim it starts (spec §1.2)."""
    env = cd.env()
    env["GOMAXPROCS"] = str(min(os.cpu_count() or 2, 2))
    env["TTRPC_ADDRESS"] = cd.ttrpc_address
    return env
