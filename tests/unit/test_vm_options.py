"""Pure logic of VM isolation: option validation, the guest's spec, the accelerator choice, qemu's
command line and the boot image helpers.  No VM is started."""

from __future__ import annotations

import io
import lzma
import os
from pathlib import Path
from typing import Any

import pytest

from podshim import errdefs
from podshim.backends.vm import spec as vmspec
from podshim.options import VMSettings
from podshim.vm import image as vmimage
from podshim.vm import layer as vmlayer
from podshim.vm import qemu


@pytest.fixture
def kernel(tmp_path: Path) -> tuple[str, str]:
    k, i = tmp_path / "vmlinux", tmp_path / "initrd.cpio"
    k.write_bytes(b"\x7fELF")
    i.write_bytes(b"070701")
    return str(k), str(i)


def _no_image() -> vmimage.Image:
    raise vmimage.ImageError("no pod VM image in /nowhere: run `podshim vm-image`")


# -- parameters ----------------------------------------------------------------------------------


def test_defaults(kernel: tuple[str, str]) -> None:
    p = vmspec.resolve_params(VMSettings(kernel_path=kernel[0], initrd_path=kernel[1]), {})
    assert (p.memory_mib, p.vcpus, p.kernel, p.initrd) == (256, 1, *kernel)


def test_image_from_the_cache(kernel: tuple[str, str]) -> None:
    img = vmimage.Image("/d", kernel[0], "/d/base.cpio", "pkg", "1", "rel", ())
    layer = vmlayer.Layer("k", kernel[1])
    p = vmspec.resolve_params(VMSettings(), {}, locate=lambda: img, locate_layer=lambda _: layer)
    assert (p.kernel, p.initrd, p.template) == (*kernel, True)
    cold = VMSettings(template=False)
    p = vmspec.resolve_params(cold, {}, locate=lambda: img, locate_layer=lambda _: layer)
    assert not p.template


def test_annotations_override_within_limits(kernel: tuple[str, str]) -> None:
    vm = VMSettings(
        memory_mib=512, kernel_path=kernel[0], initrd_path=kernel[1], max_memory_mib=1024, max_vcpus=2
    )
    p = vmspec.resolve_params(vm, {vmspec.ANN_MEMORY: "1024", vmspec.ANN_VCPUS: "2"})
    assert (p.memory_mib, p.vcpus) == (1024, 2)
    with pytest.raises(errdefs.InvalidArgument, match="exceeds the handler's limit of 1024 MiB"):
        vmspec.resolve_params(vm, {vmspec.ANN_MEMORY: "2048"})
    with pytest.raises(errdefs.InvalidArgument, match="exceeds the handler's limit of 2"):
        vmspec.resolve_params(vm, {vmspec.ANN_VCPUS: "3"})


def test_pods_cannot_grow_their_vm_unless_the_admin_allows(kernel: tuple[str, str]) -> None:
    """The default ceiling is the handler's base size: the scheduler accounted for no more."""
    vm = VMSettings(kernel_path=kernel[0], initrd_path=kernel[1])
    assert vmspec.resolve_params(vm, {vmspec.ANN_MEMORY: "128"}).memory_mib == 128  # smaller is fine
    assert vmspec.resolve_params(vm, {vmspec.ANN_MEMORY: "256", vmspec.ANN_VCPUS: "1"}).memory_mib == 256
    source = "handler options file /etc/podshim/podshim.toml"
    with pytest.raises(errdefs.InvalidArgument, match=rf"of 256 MiB \(vm.max_memory_mib in {source}\)"):
        vmspec.resolve_params(vm, {vmspec.ANN_MEMORY: "16384"}, source=source)
    with pytest.raises(errdefs.InvalidArgument, match="limit of 1 \\(vm.max_vcpus in"):
        vmspec.resolve_params(vm, {vmspec.ANN_VCPUS: "2"})
    bigger = VMSettings(kernel_path=kernel[0], initrd_path=kernel[1], memory_mib=512, vcpus=2)
    with pytest.raises(errdefs.InvalidArgument, match="limit of 512 MiB"):
        vmspec.resolve_params(bigger, {vmspec.ANN_MEMORY: "513"})


@pytest.mark.parametrize(
    ("settings", "annotations", "message"),
    [
        ({"memory_mib": 64}, {}, "VM memory 64 MiB is below the minimum of 128 MiB"),
        ({}, {vmspec.ANN_MEMORY: "100"}, "below the minimum"),
        ({}, {vmspec.ANN_MEMORY: "lots"}, "is not an integer"),
        ({}, {vmspec.ANN_VCPUS: "0"}, "at least 1"),
        ({"kernel_path": "/no/such/vmlinux"}, {}, "VM kernel /no/such/vmlinux does not exist"),
    ],
)
def test_bad_options_are_invalid_argument(
    kernel: tuple[str, str], settings: dict[str, Any], annotations: dict[str, str], message: str
) -> None:
    vm = VMSettings(**{"kernel_path": kernel[0], "initrd_path": kernel[1], **settings})
    with pytest.raises(errdefs.InvalidArgument, match=message):
        vmspec.resolve_params(vm, annotations)


def test_missing_image_is_invalid_argument() -> None:
    with pytest.raises(errdefs.InvalidArgument, match="podshim vm-image"):
        vmspec.resolve_params(VMSettings(), {}, locate=_no_image)


# -- the guest's spec ------------------------------------------------------------------------------


CRI_LIKE: dict[str, Any] = {
    "root": {"path": "/host/bundle/rootfs", "readonly": False},
    "process": {"args": ["sh"], "apparmorProfile": "cri-containerd.apparmor.d", "selinuxLabel": "x"},
    "hooks": {"prestart": [{"path": "/usr/bin/hook"}]},
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/etc/hosts",
            "type": "bind",
            "source": "/var/lib/x/hosts",
            "options": ["rbind", "ro"],
        },
        {"destination": "/data", "source": "/srv/data", "options": ["bind"]},
        {"destination": "/dev/shm", "type": "bind", "source": "/run/sandboxes/p/shm", "options": ["rbind"]},
    ],
    "linux": {
        "cgroupsPath": "kubepods-besteffort.slice:cri-containerd:abc",
        "mountLabel": "y",
        "namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1234"},
            {"type": "ipc", "path": "/proc/42/ns/ipc"},
            {"type": "uts", "path": "/somewhere/else"},
            {"type": "mount"},
        ],
    },
}


def test_tcg_translation_cache_size(kernel: tuple[str, str], tmp_path: Path) -> None:
    k, i = kernel
    params = vmspec.resolve_params(VMSettings(kernel_path=k, initrd_path=i, tcg_tb_size_mib=32), {})
    assert params.tb_size_mib == 32
    for bad in (4, 4096):
        with pytest.raises(errdefs.InvalidArgument, match="tcg_tb_size_mib"):
            vmspec.resolve_params(VMSettings(kernel_path=k, initrd_path=i, tcg_tb_size_mib=bad), {})
    cfg = qemu.VMConfig("p", 256, 1, k, i, str(tmp_path), tb_size_mib=32)
    assert "tcg,tb-size=32" in qemu.qemu_argv(cfg, qemu.Accel("tcg", "test"), 0)
    default = qemu.VMConfig("p", 256, 1, k, i, str(tmp_path))
    assert f"tcg,tb-size={qemu.TCG_TB_SIZE_MIB}" in qemu.qemu_argv(default, qemu.Accel("tcg", "test"), 0)


def test_guest_spec() -> None:
    out, binds = vmspec.guest_spec(CRI_LIKE, "/run/podshim/shared/c1", is_dir=lambda p: p == "/srv/data")
    assert out["root"]["path"] == "rootfs"
    assert binds == [
        vmspec.Bind("/var/lib/x/hosts", "mounts/0", False),
        vmspec.Bind("/srv/data", "mounts/1", True),
    ]
    m = {x["destination"]: x for x in out["mounts"]}
    assert m["/etc/hosts"]["source"] == "/run/podshim/shared/c1/mounts/0"
    assert m["/etc/hosts"]["options"] == ["rbind", "ro"]
    assert m["/data"]["source"] == "/run/podshim/shared/c1/mounts/1"
    assert m["/dev/shm"]["source"] == "/dev/shm"  # the VM's own: one per pod
    assert m["/proc"] == CRI_LIKE["mounts"][0]
    assert out["linux"]["namespaces"] == [
        {"type": "pid"},
        {"type": "ipc", "path": "/proc/42/ns/ipc"},  # a guest pid: right as it is
        {"type": "uts"},
        {"type": "mount"},
    ]
    assert out["linux"]["cgroupsPath"] == "/podshim/abc"
    assert "mountLabel" not in out["linux"] and "hooks" not in out
    assert "apparmorProfile" not in out["process"] and "selinuxLabel" not in out["process"]
    assert CRI_LIKE["linux"]["namespaces"][1]["path"] == "/var/run/netns/cni-1234"  # input untouched


def test_guest_process() -> None:
    assert vmspec.guest_process({"args": ["x"], "apparmorProfile": "p"}) == {"args": ["x"]}


# -- accelerator and command line ---------------------------------------------------------------


def _kvm_host(tmp_path: Path, modules: tuple[str, ...] = ()) -> tuple[str, str]:
    dev = tmp_path / "kvm"
    dev.write_text("")
    sysmod = tmp_path / "module"
    for m in ("kvm", *modules):
        (sysmod / m).mkdir(parents=True)
    return str(dev), str(sysmod)


def test_accel_kvm_only_with_vmx_or_svm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(qemu.ACCEL_ENV, raising=False)
    dev, sysmod = _kvm_host(tmp_path)
    assert qemu.detect_accel("flags\t: fpu vmx sse", dev, sysmod).name == "kvm"
    assert qemu.detect_accel("flags\t: fpu svm", dev, sysmod).name == "kvm"
    assert qemu.detect_accel("flags\t: fpu sse", dev, sysmod).name == "tcg"
    assert qemu.detect_accel("flags\t: vmx", str(tmp_path / "none"), sysmod).name == "tcg"


def test_accel_pvm_host_is_tcg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(qemu.ACCEL_ENV, raising=False)
    dev, sysmod = _kvm_host(tmp_path, ("kvm_pvm",))
    accel = qemu.detect_accel("flags\t: vmx", dev, sysmod)
    assert accel.name == "tcg" and "kvm_pvm" in accel.reason


def test_accel_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(qemu.ACCEL_ENV, "tcg")
    assert qemu.detect_accel("flags\t: vmx").name == "tcg"


def _devices(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]


def test_qemu_argv(tmp_path: Path) -> None:
    cfg = qemu.VMConfig(name="p", memory_mib=256, vcpus=2, kernel="/k", initrd="/i", run_dir=str(tmp_path))
    tcg = qemu.qemu_argv(cfg, qemu.Accel("tcg", ""), 2596124)
    joined = " ".join(tcg)
    assert f"-accel tcg,tb-size={qemu.TCG_TB_SIZE_MIB}" in joined
    assert "-m 256M" in joined and "-smp 2" in joined
    assert "tsc_early_khz=2596124" in joined and "mitigations=off" in joined
    assert f"rdinit={vmlayer.INIT}" in joined
    assert f"path={cfg.agent_socket}" in joined and "-no-reboot" in tcg
    # Hardened: seccomp on, no default devices or user config, no monitor (a cold VM has no QMP
    # either), no user-mode network.
    assert tcg[tcg.index("-sandbox") + 1].split(",")[0] == "on" and "spawn=deny" in joined
    assert "-nodefaults" in tcg and "-no-user-config" in tcg
    assert "-monitor" not in tcg and "-qmp" not in tcg and "user," not in joined
    # The guest's userland is in its initramfs: the only host directory it sees is the pod share.
    assert [a for a in tcg if a.startswith("local,")] == [
        f"local,id=shared,path={cfg.shared_dir},security_model=none,multidevs=remap"
    ]
    assert "memory-backend" not in joined and "-incoming" not in tcg
    kvm = " ".join(qemu.qemu_argv(cfg, qemu.Accel("kvm", ""), 0))
    assert "-accel kvm -cpu host" in kvm and "tsc_early_khz" not in kvm and "mitigations=off" not in kvm
    assert "-netdev" not in kvm and f"virtio-net-device,id=nic0,mac={qemu.TEMPLATE_MAC}" in kvm
    tap = qemu.VMConfig(**{**cfg.__dict__, "tap": qemu.Tap("tap0", "02:00:00:00:00:02")})
    assert "virtio-net-device,id=nic0,mac=02:00:00:00:00:02,netdev=net0" in " ".join(
        qemu.qemu_argv(tap, qemu.Accel("tcg", ""), 0)
    )


def test_template_and_clone_argv(tmp_path: Path) -> None:
    """A template's RAM is a shared file; a clone maps it privately, boots no kernel and waits for
    its state; both have the same devices (whatever the clone's network), or restoring fails."""
    base = qemu.VMConfig(name="p", memory_mib=256, vcpus=1, kernel="/k", initrd="/i", run_dir=str(tmp_path))
    template = qemu.VMConfig(**{**base.__dict__, "boot": qemu.Boot.TEMPLATE, "memory_file": "/t/memory"})
    clone = qemu.VMConfig(
        **{
            **base.__dict__,
            "boot": qemu.Boot.CLONE,
            "memory_file": "/t/memory",
            "state_file": "/t/state",
            "tap": qemu.Tap("tap0", "02:00:00:00:00:02"),
        }
    )
    accel = qemu.Accel("tcg", "")
    t, c = qemu.qemu_argv(template, accel, 0), qemu.qemu_argv(clone, accel, 0)
    assert "memory-backend-file,id=mem,size=256M,mem-path=/t/memory,share=on" in t
    assert "memory-backend-file,id=mem,size=256M,mem-path=/t/memory,share=off" in c
    assert "microvm,memory-backend=mem" in t and "microvm,memory-backend=mem" in c
    assert "-kernel" in t and "-kernel" not in c and "-initrd" not in c and "-append" not in c
    assert c[c.index("-incoming") + 1] == "defer" and "-incoming" not in t
    assert f"unix:{clone.qmp_socket},server=on,wait=off" in c
    strip = [d.split(",netdev=")[0].split(",mac=")[0] for d in _devices(t)]
    assert strip == [d.split(",netdev=")[0].split(",mac=")[0] for d in _devices(c)]


def test_host_tsc_khz() -> None:
    assert qemu.host_tsc_khz("model name\t: x\ncpu MHz\t\t: 2596.124\n") == 2596124
    assert qemu.host_tsc_khz("nothing") == 0


def test_boot_slots_limit_concurrency(tmp_path: Path) -> None:
    import asyncio

    async def main() -> None:
        a, b, c = (qemu.BootSlot(str(tmp_path), 2) for _ in range(3))
        await a.acquire()
        await b.acquire()
        waiting = asyncio.ensure_future(c.acquire(poll=0.01))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        a.release()
        await asyncio.wait_for(waiting, 1)
        b.release()
        c.release()

    asyncio.run(main())


# -- image helpers ---------------------------------------------------------------------------------


def test_kernel_package_from_depends() -> None:
    out = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n"
    assert vmimage.kernel_package_from_depends(out) == "linux-image-6.1.0-57-amd64"
    with pytest.raises(vmimage.ImageError, match="apt-get update"):
        vmimage.kernel_package_from_depends("linux-image-amd64\n")


def test_extract_vmlinux() -> None:
    elf = b"\x7fELF" + os.urandom(1000)
    bz = b"MZ setup code" + lzma.compress(elf, format=lzma.FORMAT_XZ)
    assert vmimage.extract_vmlinux(bz) == elf
    with pytest.raises(vmimage.ImageError, match="no xz payload"):
        vmimage.extract_vmlinux(b"MZ nothing here")


def test_module_load_order() -> None:
    deps = {
        "9p": ["9pnet", "netfs"],
        "9pnet": [],
        "netfs": ["fscache"],
        "fscache": [],
        "a": ["b"],
        "b": ["a"],
    }
    order = vmimage.load_order(["9p"], deps.__getitem__, deps)
    assert order.index("9pnet") < order.index("9p") and order.index("fscache") < order.index("netfs")
    with pytest.raises(vmimage.ImageError, match="cycle"):
        vmimage.load_order(["a"], deps.__getitem__, deps)
    with pytest.raises(vmimage.ImageError, match="not in the kernel package"):
        vmimage.load_order(["virtio_fs"], deps.__getitem__, deps)


def test_modinfo_depends() -> None:
    ko = b"\x00license=GPL\x00depends=virtio,virtio_ring\x00vermagic=6.1\x00"
    assert vmimage.modinfo_depends(ko) == ["virtio", "virtio_ring"]
    assert vmimage.modinfo_depends(b"\x00depends=\x00") == []


def _read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos : pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body)


def test_initramfs_layout() -> None:
    out = io.BytesIO()
    vmimage.write_initramfs(out, b"BUSYBOX", {"virtio": b"KO1", "9p": b"KO2"}, ["virtio", "9p"])
    entries = _read_cpio(out.getvalue())
    assert entries["bb/busybox"] == (0o100755, b"BUSYBOX")
    assert entries["bb/sh"] == (0o120777, b"busybox")
    assert entries["mods/order"][1] == b"virtio\n9p\n"
    assert entries["mods/9p.ko"][1] == b"KO2"
    # No init of its own: the kernel starts the guest layer's (rdinit=), so nothing here can
    # mount a host export behind the layer's back.
    assert "init" not in entries
    assert entries["dev/console"][0] & 0o170000 == 0o020000


def test_locate_explains_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(vmimage.ImageError, match="podshim vm-image"):
        vmimage.locate(str(tmp_path))
    (tmp_path / vmimage.MANIFEST).write_text('{"format": 0}')
    with pytest.raises(vmimage.ImageError, match="format 0"):
        vmimage.locate(str(tmp_path))


def test_elf_is_static() -> None:
    assert not vmimage.elf_is_static(b"#!/bin/sh\n")


# -- network -----------------------------------------------------------------------------------------


def test_pod_netns() -> None:
    from podshim.vm import network

    def spec(*ns: dict[str, str]) -> dict[str, Any]:
        return {"linux": {"namespaces": list(ns)}}

    assert (
        network.pod_netns(spec({"type": "network", "path": "/var/run/netns/cni-1"})) == "/var/run/netns/cni-1"
    )
    assert network.pod_netns(spec({"type": "network"})) == ""  # ctr: a namespace of its own
    assert network.pod_netns(spec({"type": "pid"})) == ""  # host network
    assert network.pod_netns(spec({"type": "network", "path": "/proc/7/ns/net"})) == ""


def test_guest_network() -> None:
    import socket

    from podshim.vm import network

    net = network.PodNetwork(
        netns="/n",
        ifname="eth0",
        index=3,
        mac="02:42:0a:e7:00:05",
        mtu=1450,
        addresses=(
            network.Address(socket.AF_INET, "10.231.0.5", 24),
            network.Address(socket.AF_INET6, "fd00::5", 64),
        ),
        routes=(
            network.Route(socket.AF_INET, "", 0, "10.231.0.1"),
            network.Route(socket.AF_INET, "10.9.0.0", 16, ""),
        ),
    )
    assert network.guest_network(net) == {
        "mtu": 1450,
        "addresses": [["10.231.0.5", 24], ["fd00::5", 64]],
        "routes": [["", 0, "10.231.0.1", 4], ["10.9.0.0", 16, "", 4]],
    }


def test_run_dir_for_fits_sun_path(tmp_path: Path) -> None:
    assert qemu.run_dir_for("pod1", "/run/podshim/vm") == "/run/podshim/vm/pod1"
    long_root = "/" + "r" * 60
    d = qemu.run_dir_for("a" * 64, long_root)
    assert len(os.path.join(d, "agent.sock")) <= 107 and d.startswith(long_root)
    assert qemu.run_dir_for("a" * 64, long_root) == d  # stable: the delete action finds it again


def test_clean_up_after_a_dead_shim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(qemu.RUN_ROOT_ENV, str(tmp_path))
    run_dir = Path(qemu.run_dir_for("pod"))
    (run_dir / "shared" / "c1" / "rootfs").mkdir(parents=True)
    (run_dir / "shared" / "c2").mkdir(parents=True)
    (run_dir / "qemu.pid").write_text(str(os.getpid()))  # alive, and not a qemu: not ours to keep
    qemu.clean_up_after_shim("pod", "c1")
    assert not run_dir.exists()
    qemu.clean_up_after_shim("pod", "c1")  # nothing left to do


SANDBOX_ANN = {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "s1"}


def _sandbox_spec(**linux: Any) -> dict[str, Any]:
    return {
        "annotations": dict(SANDBOX_ANN),
        "hostname": "web-0",
        "process": {"user": {"uid": 65535, "gid": 65535}, "oomScoreAdj": -998, "args": ["/pause"]},
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
            ],
            "cgroupsPath": "kubepods-besteffort.slice:cri-containerd:s1",
            "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0"},
            **linux,
        },
    }  # fmt: skip


def test_a_cri_sandbox_is_held_by_the_agent() -> None:
    args = vmspec.hold_args(_sandbox_spec(), has_stdio=False)
    assert args == {
        "namespaces": ["pid", "ipc", "uts"],
        "hostname": "web-0",
        "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0"},
        "uid": 65535,
        "gid": 65535,
        "cgroups_path": "/podshim/s1",
        "oom_score_adj": -998,
    }


def test_what_the_agent_cannot_hold_faithfully_runs_as_a_container() -> None:
    assert vmspec.hold_args(_sandbox_spec(), has_stdio=True) is None  # its output would be lost
    workload = _sandbox_spec()
    workload["annotations"]["io.kubernetes.cri.container-type"] = "container"
    assert vmspec.hold_args(workload, has_stdio=False) is None
    assert vmspec.hold_args({"linux": {}}, has_stdio=False) is None  # ctr run: no annotations
    userns = _sandbox_spec(namespaces=[{"type": "user"}, {"type": "pid"}])
    assert vmspec.hold_args(userns, has_stdio=False) is None
    joined = _sandbox_spec(namespaces=[{"type": "ipc", "path": "/proc/7/ns/ipc"}])
    assert vmspec.hold_args(joined, has_stdio=False) is None
