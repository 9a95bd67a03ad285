"""Diag on real pods through containerd's CRI plugin: `podshim ps`/`tasks` agree with CRI for a
process pod, a host pod and a VM pod; `stacks`; `exec` and `share` into a VM's guest; and
`podshim monitor`'s /metrics, scraped over HTTP and parsed with prometheus-client's parser,
with its labelled series, its request counts, and a SIGSTOPped shim that does not fail it.

The VM checks share one boot (TCG is slow)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.containerd import VENV_BIN
from harness.poll import wait_until
from prometheus_client.parser import text_string_to_metric_families

from podshim.vm import image as vmimage

from .checks import wait_no_shim
from .client import RUNNING, CriClient, Pod
from .harness import HOST_HANDLER, PODSHIM_HANDLER, SHIM_BINARIES, CriContainerd, shim_servers

PODSHIM_CLI = str(VENV_BIN / "podshim")
SLEEPER = ["sleep", "3600"]


def run_host_pod(cri: CriClient, cd: CriContainerd, name: str) -> Pod:
    """The one place this file asks for a host-process pod: the admin's handler, its rootfs where
    that handler allows it."""
    location = str(cd.host_rootfs_locations / "pods")
    return cri.run_pod(name, HOST_HANDLER, {"podshim.io/hostprocess-rootfs-location": location}, host=True)


def podshim(*args: str, timeout: float = 120.0, input: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PODSHIM_CLI, *args], capture_output=True, text=True, timeout=timeout, input=input, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


def ps(cd: CriContainerd) -> dict[str, dict[str, Any]]:
    """`podshim ps --json`, this containerd's pods only, by pod id."""
    res = podshim("ps", "--json")
    assert res.returncode == 0, res.stderr
    return {
        e["pod"]["id"]: e
        for e in json.loads(res.stdout)
        if cd.address in e["containerd_address"] and "pod" in e
    }


def check_against_cri(cri: CriClient, pod: Pod, entry: dict[str, Any], isolation: str) -> None:
    meta = pod.config.metadata
    assert entry["pod"] == {
        "id": pod.id, "name": meta.name, "namespace": meta.namespace, "uid": meta.uid, "isolation": isolation,
    }  # fmt: skip
    assert entry["pid"] == shim_servers(SHIM_BINARIES[PODSHIM_HANDLER], pod.id)[0].pid
    tasks = {t["id"]: t for t in entry["tasks"]}
    assert tasks[pod.id]["kind"] == "sandbox"
    assert tasks[pod.id]["init"]["state"] == "running"
    assert tasks[pod.id]["init"]["pid"] == cri.sandbox_pid(pod.id)
    assert set(tasks) == {pod.id, *pod.containers}
    for cid, name in pod.containers.items():
        st, info = cri.container_status(cid)
        assert tasks[cid]["kind"] == "container" and tasks[cid]["name"] == name
        assert tasks[cid]["init"]["pid"] == int(info["pid"])
        assert (tasks[cid]["init"]["state"] == "running") == (st.state == RUNNING)
    assert entry["shim"]["rss_bytes"] > 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Monitor:
    def __init__(self, timeout: float = 2.0) -> None:
        self.port = free_port()
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [PODSHIM_CLI, "monitor", "--listen", f"127.0.0.1:{self.port}", "--timeout", str(timeout)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def scrape(self) -> dict[str, list[Any]]:
        """Every sample, by sample name, parsed by prometheus-client's own parser."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url, timeout=self.timeout + 20) as resp:
                    text = resp.read().decode()
                break
            except OSError:
                assert self.proc.poll() is None, f"podshim monitor exited: {self.proc.stderr}"
                assert time.monotonic() < deadline, "podshim monitor never listened"
                time.sleep(0.2)
        samples: dict[str, list[Any]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                samples.setdefault(s.name, []).append(s)
        return samples

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def monitor() -> Iterator[Monitor]:
    m = Monitor()
    try:
        yield m
    finally:
        m.close()


def one(samples: dict[str, list[Any]], name: str, default: float | None = None, **labels: str) -> float:
    got = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    if not got and default is not None:
        return default
    assert len(got) == 1, f"{name}{labels}: {got} in {[s.labels for s in samples.get(name, [])]}"
    return float(got[0])


TASK_API = "containerd.task.v2.Task"


def test_process_and_host_pods(cri: CriClient, cri_containerd: CriContainerd, busybox: str,
                               monitor: Monitor) -> None:  # fmt: skip
    web = cri.run_pod("diag-web", PODSHIM_HANDLER)
    app = cri.run_container(web, "app", SLEEPER, image=busybox)
    node = run_host_pod(cri, cri_containerd, "diag-node")
    agent = cri.run_container(node, "agent", SLEEPER, image=busybox)
    for cid in (app, agent):
        cri.wait_container_state(cid, RUNNING)

    # ps and tasks agree with CRI.
    pods = ps(cri_containerd)
    check_against_cri(cri, web, pods[web.id], "process")
    check_against_cri(cri, node, pods[node.id], "host")
    tree = podshim("ps")
    ns = web.config.metadata.namespace
    assert f"{ns}/diag-web" in tree.stdout and f"{ns}/diag-node" in tree.stdout, tree.stdout
    top = podshim("top", "--iterations", "2", "--interval", "0.5")
    assert top.returncode == 0, top.stderr
    rows = {line.split("│")[1].strip(): line for line in top.stdout.splitlines() if "│" in line}
    assert "process" in rows[f"{ns}/diag-web"] and "host" in rows[f"{ns}/diag-node"], top.stdout
    assert "2/2" in rows[f"{ns}/diag-web"]  # running / all tasks: the sandbox and the container
    res = podshim("tasks", "diag-w")  # a pod name prefix
    assert res.returncode == 0 and app[:12] in res.stdout, res.stdout + res.stderr
    res = podshim("tasks", "--json", app)  # a container id
    assert res.returncode == 0 and json.loads(res.stdout)["pod"]["id"] == web.id
    res = podshim("tasks", "diag-")  # ambiguous: says which
    assert res.returncode != 0 and "matches 2 pods" in res.stderr
    assert "diag-web" in res.stderr and "diag-node" in res.stderr

    # stacks: the server's asyncio tasks.
    res = podshim("stacks", "diag-web")
    assert res.returncode == 0 and "asyncio task" in res.stdout and "Server.serve" in res.stdout

    # exec in the shim's namespaces of the host pod.
    res = podshim("exec", "diag-node", "--", "sh", "-c", "echo $$ > /dev/null; cat /proc/1/comm; exit 4")
    assert res.returncode == 4 and res.stdout.strip() == Path("/proc/1/comm").read_text().strip()

    # /metrics: labelled series, request counts, pod overhead.
    before = monitor.scrape()
    labels = {"pod": "diag-web", "namespace": ns, "uid": web.config.metadata.uid, "isolation": "process"}
    assert one(before, "podshim_up", **labels) == 1
    assert one(before, "podshim_up", pod="diag-node", isolation="host") == 1
    requests = "podshim_ttrpc_requests_total"
    execs = one(before, requests, 0, pod="diag-web", service=TASK_API, method="Exec", code="OK")
    assert one(before, requests, pod="diag-web", service=TASK_API, method="Create", code="OK") == 2
    for _ in range(3):
        assert cri.exec_sync(app, ["true"]).exit_code == 0
    after = monitor.scrape()
    assert one(after, requests, pod="diag-web", service=TASK_API, method="Exec", code="OK") == execs + 3
    latency = "podshim_ttrpc_request_duration_seconds_count"
    assert one(after, latency, pod="diag-web", service=TASK_API, method="Exec") == execs + 3
    assert one(after, "podshim_tasks", pod="diag-web", state="running") == 2
    assert one(after, "podshim_container_create_to_start_seconds", pod="diag-web", container="app") > 0
    assert one(after, "podshim_events_total", pod="diag-web", outcome="published") > 0
    assert one(after, "podshim_shim_memory_bytes", pod="diag-web", kind="rss") > 0
    assert one(after, "podshim_pod_overhead_memory_bytes", pod="diag-web", kind="pss") > 0

    # A stopped shim is `podshim_up 0`; the scrape still answers, with the other pod's series.
    stopped = pods[node.id]["pid"]
    os.kill(stopped, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        during = monitor.scrape()
        assert time.monotonic() - t0 < monitor.timeout + 10
        assert one(during, "podshim_up", pod="diag-node") == 0
        assert one(during, "podshim_up", pod="diag-web") == 1
        assert one(during, "podshim_shim_threads", pod="diag-web") >= 1
    finally:
        os.kill(stopped, signal.SIGCONT)

    for pod in (web, node):
        cri.stop_pod(pod.id)
        cri.remove_pod(pod.id)
        wait_no_shim(SHIM_BINARIES[PODSHIM_HANDLER], pod.id)


def test_vm_pod(cri: CriClient, cri_containerd: CriContainerd, busybox: str, tmp_path: Path) -> None:
    release = vmimage.locate().release
    pod = cri.run_pod("diag-vm", PODSHIM_HANDLER, {"podshim.io/isolation": "vm"})
    box = cri.run_container(pod, "box", SLEEPER, image=busybox)
    cri.wait_container_state(box, RUNNING, timeout=120)

    entry = ps(cri_containerd)[pod.id]
    check_against_cri(cri, pod, entry, "vm")
    assert entry["shim"]["vm_pid"] > 0 and entry["shim"]["vm_rss_bytes"] > 0

    # stacks: the shim's and the guest agent's.
    res = podshim("stacks", "diag-vm")
    assert res.returncode == 0, res.stderr
    shim_part, _, guest_part = res.stdout.partition("=== guest agent ===")
    assert "asyncio task" in shim_part and "Server.serve" in shim_part
    assert "thread reaper" in guest_part and "op_diag_stacks" in guest_part, guest_part

    # SIGUSR1 writes the shim's stacks, then the guest agent's, into the log.
    since = cri_containerd.log_size()
    os.kill(entry["pid"], signal.SIGUSR1)
    wait_until(lambda: "guest agent stacks (SIGUSR1)" in cri_containerd.log_tail(2000, since), 30,
               "the guest agent's stacks in containerd's log")  # fmt: skip
    assert "thread reaper" in cri_containerd.log_tail(2000, since)

    # exec in the guest itself: its kernel, its exit code, stdin and stderr.
    res = podshim("exec", "diag-vm", "--", "uname", "-r")
    assert (res.returncode, res.stdout.strip()) == (0, release), res.stderr
    assert release != os.uname().release
    res = podshim(
        "exec", "diag-vm", "--", "sh", "-c", "read x; echo got:$x; echo oops >&2; exit 7", input="hi\n"
    )
    assert (res.returncode, res.stdout, res.stderr) == (7, "got:hi\n", "oops\n")

    res = podshim("exec", "diag-vm", "--", "/no/such/tool")
    assert (
        res.returncode != 0 and "no such executable in the guest" in res.stderr and "not found" in res.stderr
    )
    res = podshim("exec", "-t", "diag-vm", "--", "sh", "-c", "tty; exit 2")
    assert res.returncode == 2 and "/dev/pts/" in res.stdout, (res.stdout, res.stderr)

    # share: a host directory the guest reads, read-only by default.
    src = tmp_path / "shared"
    src.mkdir()
    (src / "hello").write_text("from the host\n")
    res = podshim("share", "diag-vm", str(src), "/mnt/diag")
    assert res.returncode == 0, res.stderr
    res = podshim("exec", "diag-vm", "--", "cat", "/mnt/diag/hello")
    assert (res.returncode, res.stdout) == (0, "from the host\n"), res.stderr
    res = podshim("exec", "diag-vm", "--", "sh", "-c", "echo x > /mnt/diag/new")
    assert res.returncode != 0 and not (src / "new").exists(), "a read-only share was written"
    # From the guest's side: remounting the share read-write does not make the host's files writable.
    res = podshim(
        "exec", "diag-vm", "--", "sh", "-c", "mount -o remount,bind,rw /mnt/diag; echo x > /mnt/diag/new"
    )
    assert res.returncode != 0 and not (src / "new").exists(), "the guest wrote through a read-only share"
    res = podshim("share", "diag-vm", str(src), "/usr/evil")
    assert res.returncode != 0 and "reserved" in res.stderr

    # The VM's figures over Diag.Metrics.
    from podshim.api import diag_pb2 as D
    from podshim.cli.diag import call
    from podshim.cli.discovery import shim_process

    shim = shim_process(entry["pid"])
    assert shim is not None
    import asyncio

    metrics = asyncio.run(call(shim, "Metrics", D.MetricsRequest(), D.MetricsResponse))
    fams = {f.name: f for f in metrics.families}
    phases = {s.labels["phase"]: s.value for s in fams["podshim_vm_boot_phase_seconds"].samples}
    # A clone of the template restores where a cold VM boots its kernel.
    cold, clone = {"qemu", "kernel", "agent", "setup"}, {"qemu", "restore", "agent", "setup"}
    assert set(phases) in (cold, clone), phases
    assert phases.get("kernel", 0) > 0 or phases.get("restore", 0) > 0, phases
    ops = {s.labels["op"] for s in fams["podshim_vm_agent_request_duration_seconds"].samples}
    assert {"create", "start", "diag_exec"} <= ops
    vm_rss = next(s.value for s in fams["podshim_vm_memory_bytes"].samples if s.labels["kind"] == "rss")
    overhead = next(
        s.value for s in fams["podshim_pod_overhead_memory_bytes"].samples if s.labels["kind"] == "rss"
    )
    assert vm_rss > 0 and overhead > vm_rss

    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
    wait_no_shim(SHIM_BINARIES[PODSHIM_HANDLER], pod.id)
    wait_until(lambda: not Path(f"/proc/{entry['shim']['vm_pid']}").exists(), 20, "qemu to exit")
