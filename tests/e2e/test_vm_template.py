"""VM templates on real VMs, driven without containerd (docs/vm-isolation.md, "Templates").

* Two builders that ask for the same shape at once build one template between them.
* Three clones of it, started together, never share random bytes, uuids or boot ids, and each
  takes its own MAC, address, hostname and the host's clock (not the template's).
* A clone maps the template's memory file privately, and the file is the same after the clones
  ran as before.

One template boot, then three restores (about 0.1 s each under TCG).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from harness.guest_bundle import busybox_bundle

from podshim.system.reaper import REAPER
from podshim.vm import image as vmimage
from podshim.vm import layer as vmlayer
from podshim.vm import qemu
from podshim.vm import template as vmtemplate
from podshim.vm.client import AgentClient

CLONES = 3
# Long enough that a clone still on the template's clock would be caught.
CLOCK_GAP = 8.0

BUILDER = """
import asyncio, json, os, sys
from podshim.system.reaper import REAPER
from podshim.vm import template

async def main():
    REAPER.install(asyncio.get_running_loop())
    shape = template.Shape(**json.loads(sys.argv[2]))

    async def counting(shape, work, key):
        with open(sys.argv[3], "a") as f:
            f.write(f"{os.getpid()}\\n")
        return await template.build(shape, work, key)

    try:
        t = await template.ensure(shape, sys.argv[1], builder=counting)
    finally:
        REAPER.uninstall()
    print(t.dir)

asyncio.run(main())
"""

PROBE = (
    "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
    "cat /proc/sys/kernel/random/uuid /proc/sys/kernel/random/boot_id; "
    "ip -o link show dev eth0; ip -4 -o addr show dev eth0; hostname; date +%s"
)


def _vm_network_and_hostname(spec: dict[str, Any]) -> None:
    ns = spec["linux"]["namespaces"]
    spec["linux"]["namespaces"] = [n for n in ns if n["type"] not in ("network", "uts")]
    spec.pop("hostname", None)


def _shape() -> vmtemplate.Shape:
    try:
        img = vmimage.locate()
        return vmtemplate.Shape(256, 1, img.kernel, vmlayer.locate(img).initrd)
    except vmimage.ImageError as e:
        pytest.fail(str(e), pytrace=False)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[vmtemplate.Template]:
    """Built by two processes asking at once; removed after the module (150 MiB of memory file)."""
    shape = _shape()
    d = tmp_path_factory.mktemp("templates")
    builds = d / "builds"
    argv = [sys.executable, "-c", BUILDER, str(d), json.dumps(asdict(shape)), str(builds)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    procs = [subprocess.Popen(argv, **pipes) for _ in range(2)]  # type: ignore[call-overload]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    dirs = {out.strip() for out, _ in outs}
    assert len(dirs) == 1, f"two builders got different templates: {dirs}"
    assert len(builds.read_text().splitlines()) == 1, "both builders built a template"
    (path,) = dirs
    assert not [e for e in os.listdir(d) if e.startswith(".build-")], "a build dir is left"
    yield vmtemplate.Template(os.path.basename(path), path, shape)
    shutil.rmtree(d, ignore_errors=True)


def test_concurrent_builders_build_one_template(template: vmtemplate.Template) -> None:
    meta = json.loads(Path(template.dir, vmtemplate.META_FILE).read_text())
    assert meta["key"] == template.key
    # x-ignore-shared: the RAM stays in the memory file, the state is devices and CPUs only.
    assert meta["state_file_bytes"] < 1 << 20
    assert meta["memory_file_bytes"] > 32 << 20
    for name in (vmtemplate.MEMORY_FILE, vmtemplate.STATE_FILE):
        assert os.stat(os.path.join(template.dir, name)).st_mode & 0o777 == 0o400
    mem, state = meta["memory_file_bytes"] >> 20, meta["state_file_bytes"] >> 10
    print(f"\ntemplate built in {meta['build_seconds']:.2f} s (save {meta['save_seconds']:.3f} s), "
          f"memory file {mem} MiB, state {state} KiB")  # fmt: skip


async def _clone(t: vmtemplate.Template, n: int) -> dict[str, Any]:
    run_dir = Path(qemu.run_root()) / f"clone-{n}-{os.getpid()}"
    cfg = qemu.VMConfig(
        name=f"clone{n}",
        memory_mib=t.shape.memory_mib,
        vcpus=t.shape.vcpus,
        kernel=t.shape.kernel,
        initrd=t.shape.initrd,
        run_dir=str(run_dir),
        boot=qemu.Boot.CLONE,
        memory_file=t.memory_file,
        state_file=t.state_file,
    )
    vm = qemu.QemuVM(cfg)
    client = AgentClient(cfg.agent_socket, lambda _: None)
    t0 = time.monotonic()
    vm.spawn()
    try:
        deadline = time.monotonic() + 120
        await vm.wait_socket(deadline)
        connect = asyncio.ensure_future(client.connect(120))
        await vm.restore(deadline)
        restored = time.monotonic() - t0
        await connect
        with open(f"/proc/{vm.pid}/maps") as f:
            maps = [line.split()[1] for line in f if line.rstrip().endswith(t.memory_file)]
        await client.call(
            "setup",
            entropy=base64.b64encode(os.urandom(64)).decode(),
            time_ns=time.time_ns(),
            mac=f"02:00:00:00:77:{n:02x}",
            hostname=f"clone{n}",
            network={"mtu": 1500, "addresses": [[f"10.77.0.{10 + n}", 24]], "routes": []},
        )
        ready = time.monotonic() - t0
        busybox_bundle(Path(cfg.shared_dir), "probe", ["sh", "-c", PROBE], _vm_network_and_hostname)
        r, w = os.pipe()
        sid = client.new_stream()
        out = client.attach_output(sid, w)
        await client.call("create", id="probe", bundle=f"{vmimage.GUEST_SHARED}/probe", stdio={"stdout": sid})
        await client.call("start", id="probe")
        await asyncio.wait_for(out, 60)
        host_time = time.time()
        with os.fdopen(r, "rb") as f:
            lines = f.read().decode().splitlines()
        await client.call("delete", id="probe")
        return {"lines": lines, "maps": maps, "host_time": host_time, "restored": restored, "ready": ready}
    finally:
        await client.close()
        await vm.close()


def test_clones_are_distinct(template: vmtemplate.Template) -> None:
    before = _sha256(template.memory_file)
    time.sleep(CLOCK_GAP)  # the template's clock stands still from here

    async def main() -> list[dict[str, Any]]:
        REAPER.install(asyncio.get_running_loop())
        try:
            # Every clone closes its VM before the reaper goes, even when another one failed.
            clones = (_clone(template, n) for n in range(1, CLONES + 1))
            got = await asyncio.gather(*clones, return_exceptions=True)
        finally:
            REAPER.uninstall()
        for r in got:
            if isinstance(r, BaseException):
                raise r
        return [r for r in got if not isinstance(r, BaseException)]

    results = asyncio.run(main())
    probes = []
    for n, res in enumerate(results, 1):
        assert len(res["lines"]) == 7, res["lines"]
        rand, uuid, boot_id, link, addr, hostname, date = res["lines"]
        probes.append((rand, uuid, boot_id))
        assert f"link/ether 02:00:00:00:77:{n:02x}" in link, link
        assert f"inet 10.77.0.{10 + n}/24" in addr, addr
        assert hostname == f"clone{n}"
        assert abs(int(date) - res["host_time"]) < 3, f"clone {n} is on the template's clock: {date}"
        # Private (copy-on-write) mappings only: the guest's writes never reach the file.
        assert res["maps"] and all(perms.endswith("p") for perms in res["maps"]), res["maps"]
    for i, what in enumerate(("/dev/urandom bytes", "uuids", "boot ids")):
        values = [p[i] for p in probes]
        assert len(set(values)) == CLONES, f"clones share {what}: {values}"
    assert _sha256(template.memory_file) == before, "a clone changed the template's memory file"
    timing = ", ".join(f"{r['restored']:.2f}/{r['ready']:.2f}" for r in results)
    print(f"\n{CLONES} clones at once, restored/set up after qemu exec (s): {timing}")
