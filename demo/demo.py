"""The podshim demo: a private containerd with its CRI plugin, a Kubernetes-style pod served by
one podshim process, its containers talking over the pod's shared network namespace, and a
clean teardown.  Run it with scripts/demo.sh (which sets the machine up first)."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "e2e")]

from harness.ctr import Ctr  # noqa: E402
from harness.images import BUSYBOX_REF, build_busybox_tarball, import_image  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import tests.cri  # noqa: E402,F401  (puts the harness and the CRI stubs on sys.path)
from tests.cri.client import CriClient, rpc_error  # noqa: E402
from tests.cri.harness import (  # noqa: E402
    CRI_NAMESPACE,
    HOST_HANDLER,
    CriContainerd,
    VarLibOverlay,
    shim_servers,
)
from tests.cri.images import PAUSE_REF, build_pause_tarball  # noqa: E402

console = Console()
SHIM = "containerd-shim-podshim-v1"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p.name))
    return sorted(out)


def wait_for(pred: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("the demo waited too long")
        time.sleep(0.1)


def show_inside(pods: list[str]) -> None:
    """`podshim ps`, then a /metrics excerpt from `podshim monitor` (docs/observability.md)."""
    podshim = str(REPO / ".venv" / "bin" / "podshim")
    console.rule("podshim ps (every podshim on this machine, whatever containerd started it)")
    out = subprocess.run(
        [podshim, "ps"], capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "160"}
    )
    console.print(out.stdout, highlight=False, markup=False, end="")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monitor = subprocess.Popen(
        [podshim, "monitor", "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL
    )
    try:
        text = ""
        deadline = time.monotonic() + 20
        while not text:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                    text = resp.read().decode()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        monitor.terminate()
        monitor.wait()
    wanted = ("podshim_up{", "podshim_pod_overhead_memory_bytes{", "podshim_ttrpc_requests_total{")
    lines = [
        line for line in text.splitlines()
        if line.startswith(wanted) and any(f'pod="{p}"' in line for p in pods)
        and ("requests_total" not in line or 'method="Create"' in line or 'method="Exec"' in line)
        and ("overhead" not in line or 'kind="pss"' in line)
    ]  # fmt: skip
    console.rule(f"podshim monitor: an excerpt of http://127.0.0.1:{port}/metrics")
    print("\n".join(lines), flush=True)  # unwrapped: one sample per line
    console.rule()


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="podshim-demo-"))
    overlay = VarLibOverlay(base / "var-lib")
    cd = CriContainerd(base / "containerd", sandbox_image=PAUSE_REF)
    client: CriClient | None = None
    try:
        with console.status("starting a private containerd with its CRI plugin"):
            overlay.mount()
            cd.start()
            ctr = Ctr(cd.address, CRI_NAMESPACE, timeout=60.0)
            for image in (build_pause_tarball(base / "images"), build_busybox_tarball(base / "busybox.tar")):
                import_image(ctr, image)
            client = CriClient(cd.address, cgroup_parent="/podshim-demo", log_root=cd.pod_log_root)
            wait_for(lambda: client.image_status(PAUSE_REF) and client.image_status(BUSYBOX_REF))
        console.print(f"[green]✓[/] containerd {cd.address} (root, state and sockets under {base})")

        pod = client.run_pod("demo", "podshim")
        status, info = client.pod_status(pod.id)
        console.print(
            f"[green]✓[/] RunPodSandbox with runtime handler [bold]podshim[/]: pod {pod.id[:12]}, "
            f"IP {status.network.ip}, sandbox pid {info['pid']}"
        )
        web = client.run_container(
            pod,
            "web",
            [
                "sh",
                "-c",
                "mkdir -p /www && echo hello from the web container > /www/index.html "
                "&& exec httpd -f -p 127.0.0.1:8080 -h /www",
            ],  # fmt: skip
            image=BUSYBOX_REF,
        )
        fetch = client.run_container(
            pod,
            "fetch",
            ["sh", "-c", "until wget -qO- http://127.0.0.1:8080/; do sleep 0.2; done; sleep 3600"],
            image=BUSYBOX_REF,
        )
        console.print(
            "[green]✓[/] two containers started: [bold]web[/] (httpd on 127.0.0.1:8080) and [bold]fetch[/]"
        )
        output = client.wait_log(pod, fetch, "hello from the web container")
        console.print(f"[green]✓[/] fetch reached web over the pod's shared localhost: {output.strip()!r}")

        shims = shim_servers(SHIM, pod.id)
        table = Table(title="processes of the pod")
        table.add_column("pid", justify="right")
        table.add_column("process")
        table.add_column("RSS MiB", justify="right")
        for s in shims:
            table.add_row(str(s.pid), f"podshim server for pod {pod.id[:12]}", f"{rss_mib(s.pid):.1f}")
            for child in children(s.pid):
                table.add_row(str(child), "  └ " + cmdline(child)[:60], f"{rss_mib(child):.1f}")
        console.print(table)
        console.print(
            f"[green]✓[/] exactly {len(shims)} podshim process serves the pod and all its containers"
        )

        res = client.exec_sync(web, ["sh", "-c", "echo exec in $(hostname): uid=$(id -u); exit 3"])
        console.print(f"[green]✓[/] ExecSync into web: {res.stdout.strip()!r}, exit code {res.exit_code}")

        # A host-process pod beside it, on the admin's podshim-host handler (the annotation alone is
        # refused): no pause process, and its container is a plain host process.
        hpod = client.run_pod("node-agent", HOST_HANDLER, host=True)
        hpid = client.sandbox_pid(hpod.id)
        agent = client.run_container(hpod, "agent", ["sleep", "3600"], image=BUSYBOX_REF)
        client.wait_container_state(agent, 1)  # RUNNING
        look = client.exec_sync(agent, ["sh", "-c", "echo $CONTAINER_SANDBOX_MOUNT_POINT; cat /proc/1/comm"])
        mount_point, init = look.stdout.split()[:2]
        console.print(
            f"[green]✓[/] host-process pod {hpod.id[:12]} (handler {HOST_HANDLER}): sandbox pid {hpid} is "
            f"the shim itself, no pause; its container sees the node's pid 1 ({init!r}) and the image at "
            f"{mount_point}"
        )
        show_inside(["demo", "node-agent"])
        client.stop_pod(hpod.id)
        client.remove_pod(hpod.id)
        client.pods.pop(hpod.id, None)
        # Any pod author can write the annotation: on the default handler it is refused.
        refusal = rpc_error(
            lambda: client.run_pod("sneaky", "podshim", {"podshim.io/isolation": "host"}, host=True)
        )
        console.print(
            f"[green]✓[/] the same pod on handler podshim, asking with podshim.io/isolation=host, is refused "
            f"({refusal.code().name}): only the node admin's handler options grant host access"
        )

        # And a VM pod: its containers run in a micro-VM with a kernel of its own.
        with console.status("booting a pod VM (qemu; TCG here takes a few seconds)"):
            vpod = client.run_pod("isolated", "podshim", {"podshim.io/isolation": "vm"})
            box = client.run_container(vpod, "box", ["sleep", "3600"], image=BUSYBOX_REF)
            client.wait_container_state(box, 1, timeout=120)  # RUNNING
            guest = client.exec_sync(box, ["uname", "-r"]).stdout.strip()
        console.print(
            f"[green]✓[/] VM pod {vpod.id[:12]} (podshim.io/isolation=vm): its container runs on kernel "
            f"{guest!r}, the node on {platform.release()!r}"
        )
        client.stop_pod(vpod.id)
        client.remove_pod(vpod.id)
        client.pods.pop(vpod.id, None)

        client.stop_container(fetch, timeout=2)
        st, _ = client.container_status(fetch)
        console.print(f"[green]✓[/] StopContainer fetch (ignores SIGTERM as pid 1): exit code {st.exit_code}")
        client.stop_pod(pod.id)
        client.remove_pod(pod.id)
        client.pods.pop(pod.id, None)
        wait_for(lambda: not shim_servers(SHIM, pod.id), timeout=10)
        console.print("[green]✓[/] StopPodSandbox + RemovePodSandbox: the shim exited, nothing left running")
        return 0
    finally:
        if client is not None:
            if client.pods:
                client.force_remove_pods(client.pods)
            client.close()
        cd.close()
        overlay.unmount()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
