"""Fixtures for the end-to-end tests.

One private containerd serves the whole session; every test gets ctr namespaces of its own (named
`psh<session token>-<n>`, which is also where ctr's default spec puts the containers' cgroups), and
an autouse guard fails any test that leaves processes, mounts, sockets, runc state, bundles or
cgroups behind. Requires root, and the private mount namespace set up by the root conftest.py.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
from harness import leaks
from harness.containerd import SHIM_MODE_ENV, PrivateContainerd, c_entry_point_built, default_shim_mode
from harness.ctr import Ctr, cleanup_namespace
from harness.images import BUSYBOX_BINARY, ImageTarball, build_busybox_tarball, import_image
from harness.runtimes import PODSHIM, RUNC_V2, RUNTIMES, runtime_id

from podshim.cli.install import host_handler

__all__ = ["PODSHIM", "RUNC_V2", "RUNTIMES", "parametrize_runtimes", "runtime_id"]

# Unique per session so that concurrent sessions on one machine never share cgroup dirs.
SESSION_TOKEN = secrets.token_hex(3)
CGROUP_PREFIX = f"psh{SESSION_TOKEN}-"
_ns_counter = itertools.count(1)

_CONTAINERD_KEY = pytest.StashKey[PrivateContainerd]()
_LOG_OFFSET_KEY = pytest.StashKey[int]()

parametrize_runtimes = pytest.mark.parametrize("runtime", RUNTIMES, ids=runtime_id)
"""For a test that takes `runtime` as an argument directly instead of through the fixture."""

CtrFactory = Callable[[], Ctr]

# VM templates of this session only, in its private /run (read by the shims its containerd
# starts): the first VM pod of a session builds one, and nothing is left on the host after.
os.environ.setdefault("PODSHIM_VM_TEMPLATE_DIR", "/run/podshim/vm-templates")


def _require_environment() -> None:
    if os.geteuid() != 0:
        pytest.fail("the e2e tests need root (containerd, runc, mounts, cgroups)", pytrace=False)
    if os.environ.get("PODSHIM_TEST_NS") != "1" or not os.environ.get("PODSHIM_TEST_RUN_DIR"):
        pytest.fail(
            "not inside the private mount namespace: run pytest from the repo root so that the root "
            "conftest.py can re-execute it under `unshare --mount`",
            pytrace=False,
        )
    missing = [b for b in ("containerd", "ctr", "runc", "containerd-shim-runc-v2") if shutil.which(b) is None]
    if not BUSYBOX_BINARY.exists():
        missing.append(str(BUSYBOX_BINARY))
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run scripts/setup.sh", pytrace=False)


def pytest_report_header(config: pytest.Config) -> str:
    mode = default_shim_mode()
    if mode == "warm" and not c_entry_point_built():
        return "podshim entry point: warm requested, but no C entry point was built (no gcc): cold"
    return f"podshim entry point: {mode} ({SHIM_MODE_ENV}=warm|cold)"


@pytest.fixture(scope="session")
def containerd(request: pytest.FixtureRequest) -> Iterator[PrivateContainerd]:
    """The session's private containerd (CRI disabled). Tests may `restart()` it."""
    _require_environment()
    cd = PrivateContainerd(Path(tempfile.mkdtemp(prefix="podshim-e2e-")))
    request.config.stash[_CONTAINERD_KEY] = cd
    try:
        cd.start()
        yield cd
    finally:
        cd.stop()
        # Whatever is still running now was started by this session: shims outlive containerd.
        leftovers = leaks.Snapshot(processes=leaks.session_processes(CGROUP_PREFIX))
        leaks.reclaim(leftovers)
        cd.close()
        leaks.remove_empty_cgroups(leaks.session_cgroups(CGROUP_PREFIX))
        del request.config.stash[_CONTAINERD_KEY]


@pytest.fixture(scope="session")
def busybox_image(containerd: PrivateContainerd) -> ImageTarball:
    """The busybox OCI tarball (built once per session); `ctr`'s namespaces already have it imported."""
    return build_busybox_tarball(containerd.base / "images" / "busybox.tar")


@pytest.fixture
def ctr_factory(containerd: PrivateContainerd, busybox_image: ImageTarball) -> Iterator[CtrFactory]:
    """Makes ctr clients, each in a fresh namespace with busybox imported; all cleaned up after the test."""
    made: list[Ctr] = []

    def new() -> Ctr:
        c = Ctr(containerd.address, f"{CGROUP_PREFIX}{next(_ns_counter)}", timeout=30.0)
        made.append(c)
        import_image(c, busybox_image)
        return c

    yield new
    problems: list[str] = []
    for c in made:
        if containerd.is_running():
            try:
                problems += cleanup_namespace(c)
            except AssertionError as e:  # CtrTimeout: a hung shim; the leak guard reclaims what is left
                problems.append(str(e))
        # runc removes a container's cgroup but not ctr's per-namespace parent dir. Only that one goes
        # here: a container cgroup still present is the guard's to report.
        leaks.remove_empty_cgroups(leaks.namespace_cgroups(c.namespace, depth=0))
    if problems:
        pytest.fail("cleaning up the test's namespaces failed:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def ctr(ctr_factory: CtrFactory) -> Ctr:
    """A ctr client for this test's own namespace, with busybox_image imported."""
    return ctr_factory()


@pytest.fixture
def host_options(tmp_path: Path) -> Path:
    """The podshim-host handler's options file (what `podshim install` writes), with a directory
    for hostprocess-rootfs-location: pass it with `ctr run --runtime-config-path` to make a
    host-process pod, as CRI does for that handler."""
    path = tmp_path / "podshim-host.toml"
    path.write_text(host_handler(rootfs_locations=(str(tmp_path / "hostprocess"),)).options)
    return path


@pytest.fixture(params=RUNTIMES, ids=runtime_id)
def runtime(request: pytest.FixtureRequest) -> str:
    """The runtime under test; every test using it runs once per entry of RUNTIMES."""
    param: str = request.param
    return param


@pytest.fixture(autouse=True)
def _e2e_guard(request: pytest.FixtureRequest, containerd: PrivateContainerd) -> Iterator[None]:
    """Fail the test if it leaks anything, then reclaim the leak so that later tests start clean."""
    request.node.stash[_LOG_OFFSET_KEY] = containerd.log_size()

    def take() -> leaks.Snapshot:
        return leaks.take(
            base=containerd.base,
            state=containerd.state,
            cgroup_prefix=CGROUP_PREFIX,
            ignore_pids=[p for p in (containerd.pid,) if p is not None],
        )

    before = take()
    yield
    if not containerd.is_running():
        containerd.start()  # a test that stopped it must not take the rest of the session down
    leaked = leaks.wait_for_no_new(before, take)
    if leaked:
        leaks.reclaim(leaked)
        pytest.fail(f"the test leaked:\n{leaked.describe()}", pytrace=False)
    blocked = containerd.blocked_loop_reports(since=request.node.stash[_LOG_OFFSET_KEY])
    if blocked:
        pytest.fail("a shim blocked its event loop:\n" + "\n".join(blocked), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    cd = item.config.stash.get(_CONTAINERD_KEY, None)
    if report.failed and cd is not None:
        tail = cd.log_tail(150, since=item.stash.get(_LOG_OFFSET_KEY, 0))
        if tail.strip():
            report.sections.append((f"containerd log during {report.when} (tail)", tail))
    return report
