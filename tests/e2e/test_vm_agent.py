"""The guest agent in a real VM, driven without containerd: the shim's side disconnects while a
container runs and exits, and a new session still learns the exit; the new session's streams and
events work.  One VM boot."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from pathlib import Path

import pytest
from harness.guest_bundle import busybox_bundle

from podshim.system.reaper import REAPER
from podshim.vm import image as vmimage
from podshim.vm import layer as vmlayer
from podshim.vm import qemu
from podshim.vm.client import AgentClient


async def _scenario(run_dir: Path, img: vmimage.Image) -> dict[str, float]:
    cfg = qemu.VMConfig(
        name="agent-test",
        memory_mib=256,
        vcpus=1,
        kernel=img.kernel,
        initrd=vmlayer.locate(img).initrd,
        run_dir=str(run_dir),
    )
    vm = qemu.QemuVM(cfg)
    events: list[dict[str, object]] = []
    t0 = time.monotonic()
    vm.spawn()
    first = AgentClient(cfg.agent_socket, events.append)
    second: AgentClient | None = None
    try:
        await vm.wait_socket(time.monotonic() + 30)
        assert await first.connect(120) == []
        ready = time.monotonic() - t0
        entropy = base64.b64encode(os.urandom(64)).decode()
        await first.call("setup", entropy=entropy, time_ns=time.time_ns(), mac="02:00:00:00:00:09")
        share = Path(cfg.shared_dir)
        busybox_bundle(share, "c1", ["sh", "-c", "sleep 1; exit 5"])
        await first.call("create", id="c1", bundle=f"{vmimage.GUEST_SHARED}/c1", stdio={})
        await first.call("start", id="c1")
        await first.close()  # the shim goes away while c1 runs, and c1 exits meanwhile
        await asyncio.sleep(2.5)
        assert events == []

        second = AgentClient(cfg.agent_socket, events.append)
        snapshot = await second.connect(30)
        assert [(p["id"], p["exited"], p["status"]) for p in snapshot] == [("c1", True, 5)]
        await second.call("delete", id="c1")

        busybox_bundle(share, "c2", ["sh", "-c", "echo hello from the second session; exit 3"])
        r, w = os.pipe()
        sid = second.new_stream()
        out = second.attach_output(sid, w)
        t1 = time.monotonic()
        await second.call("create", id="c2", bundle=f"{vmimage.GUEST_SHARED}/c2", stdio={"stdout": sid})
        await second.call("start", id="c2")
        await asyncio.wait_for(out, 30)
        first_output = time.monotonic() - t1
        assert os.read(r, 4096) == b"hello from the second session\n"
        os.close(r)
        for _ in range(100):
            if events:
                break
            await asyncio.sleep(0.05)
        assert events == [{"event": "exit", "id": "c2", "exec_id": "", "pid": events[0]["pid"], "status": 3}]
        await second.call("delete", id="c2")
        mem = vm.memory()
        return {"ready": ready, "create_to_output": first_output, "rss_mib": mem["rss"] / 2**20}
    finally:
        await first.close()
        if second is not None:
            await second.close()
        await vm.close()


def test_agent_survives_a_reconnect(tmp_path: Path) -> None:
    try:
        img = vmimage.locate()
    except vmimage.ImageError as e:
        pytest.fail(str(e), pytrace=False)
    run_dir = Path(qemu.run_root()) / f"agent-test-{os.getpid()}"

    async def main() -> dict[str, float]:
        REAPER.install(asyncio.get_running_loop())
        try:
            return await _scenario(run_dir, img)
        finally:
            REAPER.uninstall()

    stats = asyncio.run(main())
    assert not run_dir.exists()
    print(f"\nagent ready {stats['ready']:.2f} s after qemu exec; create+start to output "
          f"{stats['create_to_output']:.2f} s; qemu RSS {stats['rss_mib']:.0f} MiB")  # fmt: skip
