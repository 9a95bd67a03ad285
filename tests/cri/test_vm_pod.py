"""A hypervisor-isolated pod through containerd's CRI plugin: the pod annotation
`podshim.io/isolation: vm` puts the sandbox and every container in one utility VM.

TCG boots are slow and CPU-bound, so there are two tests and each boots one VM.  The guard in
conftest.py checks that nothing (shim, process, mount, socket, cgroup, veth) is left; these tests
also check for qemu processes and pod share dirs themselves.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import time
from pathlib import Path

from harness import leaks
from harness.ctr import Ctr
from harness.poll import wait_until

from podshim.backends.vm.spec import ANN_MEMORY
from podshim.vm import image as vmimage
from podshim.vm import qemu

from .checks import wait_no_shim
from .client import EXITED, NOTREADY, READY, RUNNING, CriClient
from .harness import CNI_SUBNET, PODSHIM_HANDLER, SHIM_BINARIES, CriContainerd
from .test_diag_pods import PODSHIM_CLI

VM = {"podshim.io/isolation": "vm"}
HTTPD = [
    "sh",
    "-c",
    "mkdir -p /www && echo pong > /www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /www",
]
SLEEPER = ["sleep", "3600"]


qemu_pids = leaks.qemu_pids


def assert_vm_gone(pod_id: str) -> None:
    wait_until(lambda: not qemu_pids(), 20, "qemu to exit")
    assert not Path(qemu.run_dir_for(pod_id)).exists(), "the pod's VM run dir (shares, sockets) is left"


def memory_of(pid: int) -> tuple[int, int]:
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key == "Rss":
            rss = int(rest.split()[0]) // 1024
        elif key == "Pss":
            pss = int(rest.split()[0]) // 1024
    return rss, pss


def test_vm_pod(cri: CriClient, cri_containerd: CriContainerd, busybox: str) -> None:
    release = vmimage.locate().release
    assert release != os.uname().release
    shim_binary = SHIM_BINARIES[PODSHIM_HANDLER]

    t0 = time.monotonic()
    pod = cri.run_pod("vmpod", PODSHIM_HANDLER, {**VM, ANN_MEMORY: "256"})
    boot = time.monotonic() - t0
    assert cri.pod_status(pod.id)[0].state == READY
    assert len(qemu_pids()) == 1

    # Two containers, in the guest: its kernel, its localhost.
    t1 = time.monotonic()
    server = cri.run_container(pod, "server", HTTPD, image=busybox)
    first_container = time.monotonic() - t1
    client = cri.run_container(pod, "client", SLEEPER, image=busybox)
    for cid in (server, client):
        assert cri.wait_container_state(cid, RUNNING).state == RUNNING
    both_running = time.monotonic() - t0
    for cid in (server, client):
        assert cri.exec_sync(cid, ["uname", "-r"]).stdout.strip() == release
        assert cri.exec_sync(cid, ["hostname"]).stdout.strip() == "vmpod"
    nets = {cri.exec_sync(cid, ["readlink", "/proc/self/ns/net"]).stdout for cid in (server, client)}
    assert len(nets) == 1, f"the containers are in different network namespaces: {nets}"
    deadline = time.monotonic() + 20
    while (got := cri.exec_sync(client, ["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"])).exit_code != 0:
        assert time.monotonic() < deadline, f"the client never reached the server over localhost: {got}"
        time.sleep(0.2)
    assert got.stdout == "pong\n"

    # The guest holds the pod IP: the node reaches it, and it reaches the node's bridge.
    pod_ip = cri.pod_status(pod.id)[0].network.ip
    assert f"inet {pod_ip}/" in cri.exec_sync(client, ["ip", "-4", "addr", "show", "eth0"]).stdout
    gateway = str(next(ipaddress.ip_network(CNI_SUBNET).hosts()))
    assert cri.exec_sync(client, ["ping", "-c", "1", "-W", "5", gateway]).exit_code == 0
    cri_containerd.netns.run("/bin/busybox", "ping", "-c", "1", "-W", "5", pod_ip)

    # ExecSync: output and exit codes.
    res = cri.exec_sync(client, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (res.stdout, res.stderr, res.exit_code) == ("out\n", "err\n", 3)

    # A container that exits on its own: its code, and its output in the log.
    quitter = cri.run_container(pod, "quitter", ["sh", "-c", "echo bye; exit 7"], image=busybox)
    st = cri.wait_container_state(quitter, EXITED, timeout=60)
    assert st.exit_code == 7
    assert cri.wait_log(pod, quitter, "bye\n")

    # SIGKILL of a workload (StopContainer with no grace) does not take the VM down.
    (qpid,) = qemu_pids()
    rss, pss = memory_of(qpid)
    cri.stop_container(client, 0)
    assert cri.container_status(client)[0].exit_code == 137
    assert qemu_pids() == [qpid]
    assert cri.exec_sync(server, ["echo", "still here"]).stdout == "still here\n"
    assert cri.pod_status(pod.id)[0].state == READY

    cri.remove_container(quitter)
    cri.stop_pod(pod.id)
    assert cri.pod_status(pod.id)[0].state == NOTREADY
    assert cri.container_status(server)[0].state == EXITED
    cri.remove_pod(pod.id)
    wait_no_shim(shim_binary, pod.id)
    assert_vm_gone(pod.id)
    print(
        f"\nVM pod: RunPodSandbox {boot:.2f} s, first container created+started {first_container:.2f} s, "
        f"RunPodSandbox to both containers running {both_running:.2f} s, "
        f"qemu RSS {rss} MiB PSS {pss} MiB"
    )


def test_vm_pod_qemu_killed(cri: CriClient, busybox: str) -> None:
    """qemu killed from outside: every container exits with status 1, the pod is NOTREADY, and
    stop and remove still clean everything up."""
    shim_binary = SHIM_BINARIES[PODSHIM_HANDLER]
    pod = cri.run_pod("vmkill", PODSHIM_HANDLER, VM)
    app = cri.run_container(pod, "app", SLEEPER, image=busybox)
    cri.wait_container_state(app, RUNNING)
    (qpid,) = qemu_pids()
    os.kill(qpid, signal.SIGKILL)
    st = cri.wait_container_state(app, EXITED, timeout=30)
    assert st.exit_code == 1
    assert cri.wait_pod_state(pod.id, NOTREADY).state == NOTREADY
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
    wait_no_shim(shim_binary, pod.id)
    assert_vm_gone(pod.id)


def test_vm_pod_sandbox_is_held_by_the_agent_not_a_pause_container(
    cri: CriClient, cri_containerd: CriContainerd, busybox: str
) -> None:
    """A VM pod's sandbox is a process of the agent's holding the pod's namespaces: seen from a
    container sharing its PID namespace (as a pod author would look), it is PID 1 and reaps
    orphans as pause does, runs as 65535 with no capability and no_new_privs, and has nothing
    to show: an empty root, no descriptor but /dev/null.  The workloads join its IPC and UTS
    namespaces; the sandbox task answers metrics; stopping the pod ends it."""
    pod = cri.run_pod("heldpod", PODSHIM_HANDLER, VM, share_pid=True)
    sandbox_pid = cri.sandbox_pid(pod.id)
    a = cri.run_container(pod, "a", SLEEPER, image=busybox)
    b = cri.run_container(pod, "b", SLEEPER, image=busybox)
    for cid in (a, b):
        assert cri.wait_container_state(cid, RUNNING).state == RUNNING

    status = cri.exec_sync(a, ["cat", "/proc/1/status"]).stdout
    fields = {k: v.split() for k, _, v in (line.partition(":") for line in status.splitlines())}
    assert fields["Name"] == ["pod-sandbox"], status
    assert fields["Uid"] == ["65535"] * 4 and fields["Gid"] == ["65535"] * 4, status
    assert fields["CapEff"] == ["0000000000000000"] and fields["CapPrm"] == ["0000000000000000"], status
    assert fields["NoNewPrivs"] == ["1"], status
    assert fields["NSpid"] == ["1"], status
    # Root in a container has no CAP_SYS_PTRACE: nothing of the holder's to open.
    peek = cri.exec_sync(a, ["ls", "-a", "/proc/1/root/"])
    assert peek.exit_code != 0 and "denied" in peek.stderr, peek

    # IPC, UTS and PID are the sandbox's (read in the guest, from the operator's side), shared
    # by both containers, and not the guest's own.
    for ns in ("ipc", "uts", "pid"):
        got = {cri.exec_sync(cid, ["readlink", f"/proc/self/ns/{ns}"]).stdout.strip() for cid in (a, b)}
        script = f"readlink /proc/{sandbox_pid}/ns/{ns}; readlink /proc/1/ns/{ns}"
        guest = subprocess.run(
            [PODSHIM_CLI, "exec", pod.id, "--", "sh", "-c", script],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout.split()  # fmt: skip
        assert got == {guest[0]} and guest[0] != guest[1], f"{ns}: containers {got}, holder and guest {guest}"
    assert cri.exec_sync(a, ["hostname"]).stdout.strip() == "heldpod"

    # An orphan that exits is reaped by the first process of the namespace: no zombie stays.
    cri.exec_sync(a, ["sh", "-c", "(sleep 0.3 &) ; sleep 2"])
    ps = cri.exec_sync(a, ["ps", "-o", "pid,stat,comm"]).stdout
    assert not [line for line in ps.splitlines()[1:] if line.split()[1].startswith("Z")], ps

    # The sandbox task: metrics and pids from the holder's cgroup, pause and resume by freezing
    # it; exec into it is refused (nothing runs there), and the pod goes on serving.
    ctr = Ctr(cri_containerd.address, "k8s.io", timeout=60.0)
    metrics = ctr.check("task", "metrics", pod.id)
    assert "pids.current" in metrics or "pids" in metrics.lower(), metrics
    assert str(sandbox_pid) in ctr.check("task", "ps", pod.id).split()
    ctr.check("task", "pause", pod.id)
    assert ctr.task_status(pod.id) == "PAUSED"
    ctr.check("task", "resume", pod.id)
    assert ctr.task_status(pod.id) == "RUNNING"
    refused = ctr.run("task", "exec", "--exec-id", "peek", pod.id, "true")
    assert refused.rc != 0 and "failed precondition" in refused.stderr.lower(), refused
    assert cri.exec_sync(a, ["echo", "still"]).stdout == "still\n"

    cri.stop_pod(pod.id)
    assert cri.pod_status(pod.id)[0].state == NOTREADY
    cri.remove_pod(pod.id)
    wait_no_shim(SHIM_BINARIES[PODSHIM_HANDLER], pod.id)
    assert_vm_gone(pod.id)
