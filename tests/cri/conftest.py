"""Fixtures for the CRI tests.

One private CRI-enabled containerd serves the package (torn down when the package is done, so
it never overlaps the e2e suite's clean-up).  Every test gets a CriClient whose pods go under a
cgroup parent of their own (`/pcri<session token>-<n>`); the `cri` fixture then fails any test
that leaves a pod, container, shim, process, mount, socket, bundle, cgroup, veth or IP address
behind, and reclaims the leak so that later tests start clean.  Requires root, and the private
mount namespace set up by the root conftest.py.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
from harness import leaks
from harness.containerd import VENV_BIN
from harness.ctr import Ctr
from harness.images import BUSYBOX_BINARY, BUSYBOX_REF, build_busybox_tarball, import_image

from .client import CriClient
from .harness import (
    CRI_NAMESPACE,
    HANDLERS,
    PODSHIM_HANDLER,
    SHIM_BINARIES,
    CriContainerd,
    CriSnapshot,
    VarLibOverlay,
    reclaim,
    remove_cgroup_parents,
    take,
)
from .images import PAUSE_REF, build_pause_tarball

SESSION_TOKEN = secrets.token_hex(3)
CGROUP_PREFIX = f"pcri{SESSION_TOKEN}-"
_counter = itertools.count(1)

_CONTAINERD_KEY = pytest.StashKey[CriContainerd]()
_LOG_OFFSET_KEY = pytest.StashKey[int]()
_CALL_FAILED_KEY = pytest.StashKey[bool]()

REQUIRED_BINARIES = (
    "containerd",
    "ctr",
    "runc",
    "containerd-shim-runc-v2",
    "gcc",
    "unshare",
    "nsenter",
    "ip",
    "mount",
)
CNI_PLUGINS = ("bridge", "host-local", "loopback")

# VM templates of this session only, in its private /run (read by the shims its containerd
# starts): the first VM pod of a session builds one, and nothing is left on the host after.
os.environ.setdefault("PODSHIM_VM_TEMPLATE_DIR", "/run/podshim/vm-templates")


def _require_environment() -> None:
    if os.geteuid() != 0:
        pytest.fail("the CRI tests need root (containerd, runc, mounts, cgroups, netns)", pytrace=False)
    if os.environ.get("PODSHIM_TEST_NS") != "1" or not os.environ.get("PODSHIM_TEST_RUN_DIR"):
        pytest.fail(
            "not inside the private mount namespace: run pytest from the repo root so that the root "
            "conftest.py re-executes it under `unshare --mount`",
            pytrace=False,
        )
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    missing += [f"/usr/lib/cni/{p}" for p in CNI_PLUGINS if not Path("/usr/lib/cni", p).exists()]
    missing += [str(p) for p in (BUSYBOX_BINARY, VENV_BIN / SHIM_BINARIES[PODSHIM_HANDLER]) if not p.exists()]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run scripts/setup.sh", pytrace=False)


def _wait_for_images(client: CriClient, refs: list[str], timeout: float = 15.0) -> None:
    """CRI learns about images imported with ctr from containerd's events: wait until it has."""
    deadline = time.monotonic() + timeout
    missing = refs
    while missing:
        missing = [r for r in refs if client.image_status(r) is None]
        if missing and time.monotonic() > deadline:
            raise RuntimeError(f"CRI does not see the imported images {missing}")
        time.sleep(0.05)


def _start_with_images(cd: CriContainerd, image_dir: Path) -> None:
    cd.start()
    images = [build_pause_tarball(image_dir), build_busybox_tarball(image_dir / "busybox.tar")]
    ctr = Ctr(cd.address, CRI_NAMESPACE, timeout=60.0)
    for image in images:
        import_image(ctr, image)
    probe = CriClient(cd.address, cgroup_parent="/", log_root=cd.pod_log_root)
    try:
        _wait_for_images(probe, [i.ref for i in images])
    finally:
        probe.close()


@pytest.fixture(scope="package")
def cri_containerd(request: pytest.FixtureRequest) -> Iterator[CriContainerd]:
    """The package's CRI containerd, with the pause and busybox images in namespace k8s.io."""
    _require_environment()
    base = Path(tempfile.mkdtemp(prefix="podshim-cri-"))
    overlay = VarLibOverlay(base / "var-lib")
    cd = CriContainerd(base / "containerd", sandbox_image=PAUSE_REF)
    request.config.stash[_CONTAINERD_KEY] = cd
    try:
        overlay.mount()
        try:
            _start_with_images(cd, base / "images")
        except Exception as e:
            # The dir (and the log) is about to go: show the log now.
            raise RuntimeError(f"starting the CRI containerd failed: {e}\n{cd.log_tail(60)}") from e
        yield cd
    finally:
        cd.stop()
        # Shims outlive containerd: whatever of ours still runs (shims name our socket in their
        # argv, containers live under our cgroup prefix) was leaked by some test; it is reclaimed.
        ours = frozenset(
            p
            for p in leaks.session_processes(CGROUP_PREFIX)
            if p.kind == "container" or cd.address in p.cmdline
        )
        leaks.reclaim(leaks.Snapshot(processes=ours))
        cd.close()
        overlay.unmount()
        remove_cgroup_parents(CGROUP_PREFIX)
        shutil.rmtree(base, ignore_errors=True)
        del request.config.stash[_CONTAINERD_KEY]


@pytest.fixture(scope="package")
def busybox(cri_containerd: CriContainerd) -> str:
    """The image reference to run containers from."""
    return BUSYBOX_REF


@pytest.fixture(params=HANDLERS)
def handler(request: pytest.FixtureRequest) -> str:
    """The runtime handler under test: podshim, and runc as the reference."""
    value: str = request.param
    return value


@pytest.fixture
def shim_binary(handler: str) -> str:
    return SHIM_BINARIES[handler]


@pytest.fixture
def cri(request: pytest.FixtureRequest, cri_containerd: CriContainerd) -> Iterator[CriClient]:
    """A CRI client for this test; the guard around it fails the test if anything is left behind."""
    cd = cri_containerd
    if not cd.is_running():
        cd.start()  # an earlier test that stopped it must not take the rest down
    request.node.stash[_LOG_OFFSET_KEY] = cd.log_size()
    client = CriClient(
        cd.address, cgroup_parent=f"/{CGROUP_PREFIX}{next(_counter)}", log_root=cd.pod_log_root
    )

    def snapshot(objects: frozenset[str] = frozenset()) -> CriSnapshot:
        return take(cd, cgroup_prefix=CGROUP_PREFIX, cri_objects=objects)

    before = snapshot()
    try:
        yield client
        # Pods the test did not remove are a leak too (unless it failed half-way, which is reported
        # already); remove them so that nothing cascades.
        failed = request.node.stash.get(_CALL_FAILED_KEY, False)
        left = frozenset() if failed else client.known_objects(client.pods)
        errors = client.force_remove_pods(client.pods)
        leaked = _poll_leaks(before, lambda: snapshot(left))
        if leaked:
            reclaim(cd, leaked)
            msg = f"the test leaked:\n{leaked.describe()}"
            if errors:
                msg += "\nand removing its pods through CRI failed:\n" + "\n".join(errors)
            pytest.fail(msg, pytrace=False)
        blocked = cd.blocked_loop_reports(since=request.node.stash[_LOG_OFFSET_KEY])
        if blocked:
            pytest.fail("a shim blocked its event loop:\n" + "\n".join(blocked), pytrace=False)
    finally:
        if client.pods and cd.is_running():
            client.force_remove_pods(client.pods)  # after a failed test: best effort
        client.close()
        remove_cgroup_parents(CGROUP_PREFIX)  # the empty ones: runc makes them, nobody removes them


def _poll_leaks(
    before: CriSnapshot, take_after: Callable[[], CriSnapshot], timeout: float = 5.0
) -> CriSnapshot:
    """Poll until nothing new is left (shims exit only after replying to Shutdown)."""
    deadline = time.monotonic() + timeout
    while True:
        leaked = take_after().minus(before)
        if not leaked or time.monotonic() >= deadline:
            return leaked
        time.sleep(0.1)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED_KEY] = report.failed
    cd = item.config.stash.get(_CONTAINERD_KEY, None)
    if report.failed and cd is not None:
        since = item.stash.get(_LOG_OFFSET_KEY, 0)
        report.sections.append((f"containerd log during {report.when} (tail)", cd.log_tail(200, since=since)))
    return report
