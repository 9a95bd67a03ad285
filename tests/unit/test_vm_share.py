"""The pod share from the attacker's side, without a VM: what qemu exports is read-only where the
shim works, and even a guest that could change that tree (were the view writable) leads none of
the shim's path operations out of it.  Needs root (mounts), in the session's private mount
namespace (the root conftest)."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from podshim import errdefs
from podshim.backends.vm.spec import Bind
from podshim.system import mounts, safepath
from podshim.vm.share import PodShare

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
MARKER = "host data\n"


def _mounted_below(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == str(path) or p.startswith(f"{path}/")]


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Path]:
    """A host directory with a marker tmpfs: what a hostile guest would like the shim to hit."""
    d = tmp_path / "victim"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "marker", str(d)], check=True)
    (d / "marker").write_text(MARKER)
    yield d
    for p in sorted(_mounted_below(tmp_path), key=len, reverse=True):
        subprocess.run(["umount", "-l", p], check=False)


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[tuple[PodShare, Path]]:
    src = tmp_path / "src"
    (src / "root").mkdir(parents=True)
    (src / "vol").mkdir()
    (src / "file").write_text("f")
    share = PodShare(str(tmp_path / "run"))
    share.open()
    share.add(
        "c1",
        {"ociVersion": "1.0.2"},
        [mounts.Mount("bind", str(src / "root"), ("rbind",))],
        [Bind(str(src / "vol"), "mounts/0", True), Bind(str(src / "file"), "mounts/1", False)],
    )
    yield share, src
    share.close()


def test_the_guest_sees_a_read_only_tree_with_writable_mounts(
    pod: tuple[PodShare, Path], tmp_path: Path
) -> None:
    share, src = pod
    view = Path(share.view) / "c1"
    assert sorted(os.listdir(view)) == ["config.json", "mounts", "rootfs"]
    for attempt in (
        lambda: os.rename(view, view.with_name("moved")),
        lambda: os.symlink("/", view.with_name("evil")),
        lambda: (view / "config.json").write_text("{}"),
        lambda: os.unlink(view / "mounts" / "1"),
    ):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    # The container's own files stay writable: its rootfs and its read-write volumes.
    (view / "rootfs" / "new").write_text("x")
    (view / "mounts" / "0" / "new").write_text("y")
    (view / "mounts" / "1").write_text("z")
    assert (src / "root" / "new").read_text() == "x" and (src / "vol" / "new").read_text() == "y"
    assert (src / "file").read_text() == "z"

    share.remove("c1")
    assert os.listdir(share.stage) == [] and os.listdir(share.view) == []
    assert _mounted_below(tmp_path / "run") == [share.stage, share.view]
    share.close()
    assert _mounted_below(tmp_path / "run") == []


@pytest.mark.parametrize("swapped", ["bundle", "mounts"])
def test_a_swapped_directory_leads_no_unmount_or_removal_out_of_the_stage(
    pod: tuple[PodShare, Path], victim: Path, swapped: str
) -> None:
    """As if the guest could write the stage: it moves c1's bundle (or its mounts dir) away and
    puts a symlink to a host mount in its place (or in place of a mount point in it).  The shim
    unmounts what it recorded, looked up without following symlinks, so the marker mount and file
    survive, and what it cannot reach it leaves where it is."""
    share, _src = pod
    c1 = Path(share.stage) / "c1"
    if swapped == "bundle":
        os.rename(c1, c1.with_name("c1.moved"))
        os.symlink(victim, c1)
    else:
        os.rename(c1 / "mounts", c1 / "moved")
        (c1 / "mounts").mkdir()
        os.symlink(victim, c1 / "mounts" / "0")
        with pytest.raises(OSError) as e:  # a mount point itself cannot be moved away
            os.rename(c1 / "rootfs", c1 / "rootfs.moved")
        assert e.value.errno == errno.EBUSY
    share.remove("c1")
    assert os.path.ismount(victim)
    assert os.listdir(victim) == ["marker"] and (victim / "marker").read_text() == MARKER


def test_a_symlink_in_place_of_a_bundle_fails_the_create(pod: tuple[PodShare, Path], victim: Path) -> None:
    share, src = pod
    os.symlink(victim, Path(share.stage) / "c2")
    with pytest.raises(errdefs.AlreadyExists):
        share.add("c2", {}, [mounts.Mount("bind", str(src / "root"), ("rbind",))], [])
    os.unlink(Path(share.stage) / "c2")
    os.mkdir(Path(share.stage) / "c2")
    os.symlink(victim, Path(share.stage) / "c2" / "rootfs")
    with pytest.raises(errdefs.AlreadyExists):
        share.add("c2", {}, [mounts.Mount("bind", str(src / "root"), ("rbind",))], [])
    assert os.listdir(victim) == ["marker"] and not _mounted_below(victim)[1:]


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "o_path-walk"])
def test_open_beneath_refuses_to_leave_or_follow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, openat2: bool
) -> None:
    monkeypatch.setattr(safepath, "_have_openat2", openat2)
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("ok")
    (root / "link").symlink_to(root / "d")
    (root / "d" / "flink").symlink_to("f")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        ok = safepath.open_beneath(fd, "d/f", os.O_RDONLY)
        assert os.read(ok, 10) == b"ok"
        os.close(ok)
        for rel, err in (
            ("../root/d/f", errno.EXDEV),
            ("/etc/passwd", errno.EXDEV),
            ("link/f", errno.ELOOP if openat2 else errno.ENOTDIR),
            ("d/flink", errno.ELOOP),
        ):
            with pytest.raises(OSError) as e:
                os.close(safepath.open_beneath(fd, rel, os.O_PATH))
            assert e.value.errno == err, rel
        safepath.mkdir_beneath(fd, "d/new")
        with pytest.raises(OSError):
            safepath.mkdir_beneath(fd, "link/new")
        assert not (root / "d" / "new" / "new").exists() and (root / "d" / "new").is_dir()
    finally:
        os.close(fd)


def test_a_read_only_diag_share_is_read_only_in_what_qemu_exports(tmp_path: Path) -> None:
    """`podshim share` without --writable: the view's copy of the mount (not only the stage's)
    is read-only, so guest root cannot write the host's files by remounting in the guest."""
    src = tmp_path / "tools"
    src.mkdir()
    share = PodShare(str(tmp_path / "run"))
    share.open()
    try:
        ro = share.add_path("1", str(src), writable=False)
        rw = share.add_path("2", str(src), writable=True)
        view = Path(share.view)
        with pytest.raises(OSError) as e:
            (view / ro / "new").write_text("x")
        assert e.value.errno == errno.EROFS
        assert not (src / "new").exists()
        (view / rw / "new").write_text("x")  # --writable: written on the host
        assert (src / "new").read_text() == "x"
    finally:
        share.close()
    assert not _mounted_below(tmp_path)
