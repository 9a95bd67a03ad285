"""Pure logic of VM templates and the guest layer: the template key, one builder at a time, a
half-built template never used, failures remembered; the layer's paths and library list.  No VM:
the builder is a fake (tests/e2e/test_vm_template.py builds real ones)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from podshim.vm import image as vmimage
from podshim.vm import layer as vmlayer
from podshim.vm import qemu
from podshim.vm import template as vmtemplate

TCG = qemu.Accel("tcg", "test")


@pytest.fixture
def shape(tmp_path: Path) -> vmtemplate.Shape:
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF")
    (tmp_path / "initrd.cpio").write_bytes(b"070701")
    return vmtemplate.Shape(256, 1, str(tmp_path / "vmlinux"), str(tmp_path / "initrd.cpio"))


@pytest.fixture(autouse=True)
def _tcg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu, "detect_accel", lambda: TCG)


def test_key_follows_every_input(shape: vmtemplate.Shape) -> None:
    k = vmtemplate.key(shape, TCG)
    assert k == vmtemplate.key(shape, TCG)
    assert k != vmtemplate.key(vmtemplate.Shape(512, 1, shape.kernel, shape.initrd), TCG)
    assert k != vmtemplate.key(vmtemplate.Shape(256, 2, shape.kernel, shape.initrd), TCG)
    assert k != vmtemplate.key(vmtemplate.Shape(256, 1, shape.kernel, shape.initrd, faults=True), TCG)
    assert k != vmtemplate.key(shape, qemu.Accel("kvm", ""))
    # A rebuilt initramfs at the same path (a new agent, new host packages) is a new template.
    st = os.stat(shape.initrd)
    os.utime(shape.initrd, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert k != vmtemplate.key(shape, TCG)


class FakeBuilder:
    def __init__(self, fail: bool = False, delay: float = 0.0) -> None:
        self.calls = 0
        self.fail = fail
        self.delay = delay

    async def __call__(self, shape: vmtemplate.Shape, work: str, key: str) -> dict[str, float]:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("qemu says no")
        for name in (vmtemplate.MEMORY_FILE, vmtemplate.STATE_FILE):
            Path(work, name).write_bytes(b"x")
        return {"build_seconds": self.delay}


def test_concurrent_ensures_build_once(shape: vmtemplate.Shape, tmp_path: Path) -> None:
    root = str(tmp_path / "templates")
    builder = FakeBuilder(delay=0.3)

    async def main() -> list[vmtemplate.Template]:
        # Each ensure opens its own lock fd: flock excludes them as it would two processes.
        return list(await asyncio.gather(*(vmtemplate.ensure(shape, root, builder) for _ in range(3))))

    got = asyncio.run(main())
    assert builder.calls == 1
    assert len({t.dir for t in got}) == 1
    meta = json.loads(Path(got[0].dir, vmtemplate.META_FILE).read_text())
    assert meta["key"] == got[0].key and meta["accel"] == "tcg"
    assert not [e for e in os.listdir(root) if e.startswith(".build-")]
    # Cached: no second build.
    asyncio.run(vmtemplate.ensure(shape, root, builder))
    assert builder.calls == 1


def test_a_half_built_template_is_never_used(shape: vmtemplate.Shape, tmp_path: Path) -> None:
    root = tmp_path / "templates"
    k = vmtemplate.key(shape, TCG)
    # What a builder killed half-way leaves: files, but no meta.json (written last).
    (root / k).mkdir(parents=True)
    (root / k / vmtemplate.MEMORY_FILE).write_bytes(b"partial")
    builder = FakeBuilder()
    t = asyncio.run(vmtemplate.ensure(shape, str(root), builder))
    assert builder.calls == 1
    assert (root / k / vmtemplate.MEMORY_FILE).read_bytes() == b"x"
    assert t.dir == str(root / k)


def test_a_failed_build_is_remembered_then_retried(
    shape: vmtemplate.Shape, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = str(tmp_path / "templates")
    failing = FakeBuilder(fail=True)
    with pytest.raises(vmtemplate.TemplateUnavailable, match="qemu says no"):
        asyncio.run(vmtemplate.ensure(shape, root, failing))
    # Pods after it boot cold without trying again...
    with pytest.raises(vmtemplate.TemplateUnavailable, match="failed recently: RuntimeError: qemu says no"):
        asyncio.run(vmtemplate.ensure(shape, root, failing))
    assert failing.calls == 1
    # ... until the retry delay has passed.
    now = time.time()
    monkeypatch.setattr(vmtemplate.time, "time", lambda: now + vmtemplate.RETRY_AFTER + 1)
    good = FakeBuilder()
    t = asyncio.run(vmtemplate.ensure(shape, root, good))
    assert good.calls == 1 and os.path.isfile(t.memory_file)


def test_invalidate_removes_the_template_and_the_next_ensure_rebuilds(
    shape: vmtemplate.Shape, tmp_path: Path
) -> None:
    root = str(tmp_path / "templates")
    builder = FakeBuilder()
    t = asyncio.run(vmtemplate.ensure(shape, root, builder))
    with open(t.memory_file, "rb") as mapped:  # a running clone keeps what it maps
        vmtemplate.invalidate(t, "restore failed")
        assert mapped.read() == b"x"
    assert not os.path.exists(t.dir)
    asyncio.run(vmtemplate.ensure(shape, root, builder))
    assert builder.calls == 2


def test_layer_paths_are_merged_usr() -> None:
    assert vmlayer._usr("/lib/x86_64-linux-gnu/libc.so.6") == "/usr/lib/x86_64-linux-gnu/libc.so.6"
    assert vmlayer._usr("/lib64/ld-linux-x86-64.so.2") == "/usr/lib64/ld-linux-x86-64.so.2"
    assert vmlayer._usr("/usr/bin/python3.11") == "/usr/bin/python3.11"


def test_layer_libraries_from_ldd() -> None:
    ldd = (
        "\tlinux-vdso.so.1 (0x00007ffd)\n"
        "\tlibseccomp.so.2 => /lib/x86_64-linux-gnu/libseccomp.so.2 (0x00007f30)\n"
        "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f30)\n"
        "\t/lib64/ld-linux-x86-64.so.2 (0x00007f30)\n"
    )
    libs = vmlayer._libraries(["/usr/sbin/runc"], lambda argv: ldd)
    assert libs == {
        "/lib/x86_64-linux-gnu/libseccomp.so.2",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
    }


def test_layer_entries_keep_sonames_as_symlinks(tmp_path: Path) -> None:
    real = tmp_path / "lib" / "libz.so.1.2.13"
    real.parent.mkdir()
    real.write_bytes(b"z")
    (tmp_path / "lib" / "libz.so.1").symlink_to("libz.so.1.2.13")
    entries = vmlayer._entries({str(tmp_path / "lib" / "libz.so.1")})
    assert entries[str(real)] == ("file", str(real))
    assert entries[str(tmp_path / "lib" / "libz.so.1")] == ("symlink", "libz.so.1.2.13")


def test_layer_locate_refuses_a_stale_layer(tmp_path: Path) -> None:
    base = tmp_path / "initrd.cpio"
    base.write_bytes(b"base")
    host_file = tmp_path / "python3.11"
    host_file.write_bytes(b"py")
    img = vmimage.Image(str(tmp_path), str(tmp_path / "vmlinux"), str(base), "pkg", "1", "rel", ())
    with pytest.raises(vmimage.ImageError, match="no guest layer for this podshim"):
        vmlayer.locate(img)
    (tmp_path / vmlayer.SUBDIR).mkdir()
    (tmp_path / vmlayer.SUBDIR / "initrd-k.cpio").write_bytes(b"base+layer")
    manifest = {
        "key": "k",
        "initrd": "initrd-k.cpio",
        "base": vmlayer._identity(str(base)),
        "inputs": {str(host_file): vmlayer._identity(str(host_file))},
    }
    path = Path(vmlayer._manifest_path(str(tmp_path), vmlayer.agent_hash()))
    path.write_text(json.dumps(manifest))
    assert vmlayer.locate(img) == vmlayer.Layer("k", str(tmp_path / vmlayer.SUBDIR / "initrd-k.cpio"))
    host_file.write_bytes(b"python upgraded")
    with pytest.raises(vmimage.ImageError, match="changed since the guest layer was built"):
        vmlayer.locate(img)


def _cpio_names(data: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    pos = 0
    while data[pos : pos + 6] == b"070701":
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        out[name] = data[pos : pos + size]
        pos = (pos + size + 3) & ~3
    return out


def test_the_layer_holds_the_init_switch_root_needs_and_the_agents_modules() -> None:
    """The base archive has no init: busybox's switch_root refuses to leave a root without a
    regular /init, so the layer brings one (a cold boot panicked without it).  The agent's
    modules are podshim.guest.export_files, the shared ones included."""
    import io
    import json

    from podshim import guest

    def run(argv: list[str]) -> str:
        if argv[0] == "ldd":
            return ""
        return json.dumps({"files": [], "executable": vmlayer.PYTHON})

    out = io.BytesIO()
    vmlayer.build(out, vmlayer._agent_dir(), run, log=lambda _msg: None)
    names = _cpio_names(out.getvalue())
    assert names["init"] == names[vmlayer.INIT.lstrip("/")] == vmlayer.INIT_SCRIPT.encode()
    for rel, data in guest.export_files().items():
        assert names[f"{vmlayer.GUEST_AGENT_ROOT.lstrip('/')}/podshim/guest/{rel}"] == data


def test_pruning_removes_only_what_no_shape_can_use_again(tmp_path: Path) -> None:
    """Templates and guest layers of earlier podshims are 150 and 28 MiB each: `podshim vm-image`
    removes the templates no shape keys to any more (an input gone or rebuilt) and the earlier
    layers, and keeps the current ones and anything being built."""
    kernel, current, old = tmp_path / "vmlinux", tmp_path / "initrd-new.cpio", tmp_path / "gone.cpio"
    kernel.write_bytes(b"k")
    current.write_bytes(b"i")
    top = tmp_path / "templates"
    accel = qemu.Accel("tcg", "test")

    def template(initrd: Path, name: str = "") -> Path:
        shape = vmtemplate.Shape(256, 1, str(kernel), str(initrd))
        d = top / (name or vmtemplate.key(shape, accel))
        d.mkdir(parents=True)
        (d / vmtemplate.META_FILE).write_text(json.dumps({"shape": asdict(shape)}))
        return d

    keep = template(current)
    gone = template(old, name="0" * 24)  # its initramfs was removed
    rebuilt = template(current, name="1" * 24)  # built on an earlier file at the same path
    building = top / ".build-x"
    building.mkdir()
    (top / "recent.failed").write_text(json.dumps({"at": time.time(), "reason": "r"}))
    (top / "old.failed").write_text(
        json.dumps({"at": time.time() - 2 * vmtemplate.RETRY_AFTER, "reason": "r"})
    )
    removed = vmtemplate.prune(str(top), accel)
    assert sorted(removed) == sorted([str(gone), str(rebuilt), str(top / "old.failed")])
    assert keep.is_dir() and building.is_dir() and (top / "recent.failed").exists()
    assert not list(top.glob("*.stale-*"))

    img = vmimage.Image(
        dir=str(tmp_path),
        kernel=str(kernel),
        initrd=str(current),
        package="p",
        version="v",
        release="r",
        modules=(),
    )
    guest = tmp_path / vmlayer.SUBDIR
    guest.mkdir()
    for name, initrd in (("a" * 32, "initrd-a.cpio"), ("b" * 32, "initrd-b.cpio")):
        (guest / f"{name}.json").write_text(json.dumps({"initrd": initrd}))
        (guest / initrd).write_bytes(b"x")
    removed = vmlayer.prune(img, keep=str(guest / f"{'b' * 32}.json"))
    assert sorted(os.path.basename(p) for p in removed) == [f"{'a' * 32}.json", "initrd-a.cpio"]
    assert sorted(os.listdir(guest)) == [f"{'b' * 32}.json", "initrd-b.cpio"]
