"""A pod's life through CRI: RunPodSandbox, containers, ExecSync, exits, restarts, stops, removal.

Every test runs with handler `podshim` and with `runc` (containerd's runc shim) as the reference;
the assertions are the same for both.  The autouse guard (conftest.py) then checks that nothing
(pod, shim, process, mount, socket, bundle, cgroup, veth, IP address) is left behind.
"""

from __future__ import annotations

import ipaddress
import json
import time

import grpc  # type: ignore[import-untyped]

from .checks import assert_one_shim, wait_no_shim
from .client import EXITED, NOTREADY, READY, RUNNING, CriClient, rpc_error
from .harness import CNI_SUBNET, CriContainerd, net_namespace

# busybox httpd, bound to localhost only: reachable only from the pod's own network namespace.
HTTPD = [
    "sh",
    "-c",
    "mkdir -p /www && echo pong > /www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /www",
]
SLEEPER = ["sleep", "3600"]


def test_pod_lifecycle(
    cri: CriClient, cri_containerd: CriContainerd, busybox: str, handler: str, shim_binary: str
) -> None:
    # 1. RunPodSandbox: ready, with an address from our CNI network, on the requested handler.
    pod = cri.run_pod("lifecycle", handler, {"podshim.io/note": "pod", "other.io/x": "filtered"})
    status, info = cri.pod_status(pod.id)
    assert status.state == READY
    assert ipaddress.ip_address(status.network.ip) in ipaddress.ip_network(CNI_SUBNET)
    assert info["runtimeHandler"] == handler
    sandbox_pid = int(info["pid"])
    # The handler's pod_annotations globs decide what reaches the shim.
    sandbox_spec = json.loads((cri_containerd.bundle(pod.id) / "config.json").read_text())
    assert sandbox_spec["annotations"]["podshim.io/note"] == "pod"
    assert "other.io/x" not in sandbox_spec["annotations"]
    assert sandbox_spec["annotations"]["io.kubernetes.cri.container-type"] == "sandbox"

    # 2. Two containers.
    server = cri.run_container(pod, "server", HTTPD, image=busybox, annotations={"podshim.io/role": "server"})
    client = cri.run_container(pod, "client", SLEEPER, image=busybox)
    for cid in (server, client):
        assert cri.wait_container_state(cid, RUNNING).state == RUNNING
    spec = json.loads((cri_containerd.bundle(server).joinpath("config.json")).read_text())
    assert spec["annotations"]["podshim.io/role"] == "server"
    assert spec["annotations"]["podshim.io/note"] == "pod"
    assert spec["annotations"]["io.kubernetes.cri.sandbox-id"] == pod.id

    # 3. One network (and UTS) namespace: the sandbox's.  localhost reaches the other container.
    for cid in (server, client):
        assert cri.exec_sync(cid, ["readlink", "/proc/self/ns/net"]).stdout.strip() == net_namespace(
            sandbox_pid
        )
        assert cri.exec_sync(cid, ["hostname"]).stdout.strip() == "lifecycle"
    deadline = time.monotonic() + 10
    while (got := cri.exec_sync(client, ["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"])).exit_code != 0:
        assert time.monotonic() < deadline, f"the client never reached the server over localhost: {got}"
        time.sleep(0.1)
    assert got.stdout == "pong\n"

    # 4. One shim serves the whole pod.
    assert_one_shim(cri, pod, shim_binary, [server, client])

    # 5. ExecSync: output, exit codes, and a process that cannot start.
    res = cri.exec_sync(client, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (res.stdout, res.stderr, res.exit_code) == ("out\n", "err\n", 3)
    assert cri.exec_sync(client, ["true"]).exit_code == 0
    err = rpc_error(lambda: cri.exec_sync(client, ["/no/such/binary"]))
    assert err.code() == grpc.StatusCode.UNKNOWN
    assert "no such file or directory" in err.details()
    assert cri.container_status(client)[0].state == RUNNING  # a failed exec leaves the container alone

    # 6. A container that exits on its own: real exit code, FinishedAt, and its output in the log.
    before = time.time_ns()
    quitter = cri.run_container(pod, "quitter", ["sh", "-c", "echo bye; exit 7"], image=busybox)
    st = cri.wait_container_state(quitter, EXITED)
    assert st.exit_code == 7
    assert st.reason == "Error"
    now = time.time_ns()
    assert before <= st.started_at <= now
    assert before <= st.finished_at <= now
    # CRI stamps StartedAt itself once Start has returned, the shim stamps the exit: a process
    # that exits at once can "finish" a little before it "started".
    assert st.finished_at > st.started_at - 10**9
    assert cri.wait_log(pod, quitter, "bye\n")

    # 9. StopPodSandbox stops every container and the sandbox; RemovePodSandbox removes them all.
    cri.stop_pod(pod.id)
    assert cri.pod_status(pod.id)[0].state == NOTREADY
    for cid in (server, client, quitter):
        assert cri.container_status(cid)[0].state == EXITED
    assert cri.container_status(quitter)[0].exit_code == 7
    cri.remove_pod(pod.id)
    assert [p for p in cri.list_pods() if p.id == pod.id] == []
    assert cri.list_containers(pod.id) == []

    # 10. The shim is gone (the guard checks processes, mounts, sockets, cgroups and CNI as well).
    wait_no_shim(shim_binary, pod.id)


def test_container_restarted_under_the_same_name(
    cri: CriClient, busybox: str, handler: str, shim_binary: str
) -> None:
    pod = cri.run_pod("restart", handler)
    first = cri.run_container(pod, "app", ["sh", "-c", "echo run-0; exit 1"], image=busybox)
    assert cri.wait_container_state(first, EXITED).exit_code == 1

    # The kubelet's way: the next attempt is created while the exited one still exists.
    second = cri.run_container(
        pod, "app", ["sh", "-c", "echo run-1; exec sleep 3600"], image=busybox, attempt=1
    )
    assert second != first
    st = cri.wait_container_state(second, RUNNING)
    assert (st.metadata.name, st.metadata.attempt) == ("app", 1)
    assert cri.wait_log(pod, second, "run-1\n")
    cri.remove_container(first)

    # Remove first, then create again: the shim must take a new task into the same pod.
    cri.stop_container(second, 0)
    assert cri.container_status(second)[0].exit_code == 137
    cri.remove_container(second)
    third = cri.run_container(
        pod, "app", ["sh", "-c", "echo run-2; exec sleep 3600"], image=busybox, attempt=2
    )
    assert cri.wait_container_state(third, RUNNING).metadata.attempt == 2
    assert cri.wait_log(pod, third, "run-2\n")
    # Same name and attempt as a live container: CRI refuses before the shim is asked.
    err = rpc_error(lambda: cri.create_container(pod, "app", SLEEPER, image=busybox, attempt=2))
    assert "is reserved" in err.details()
    assert [c.id for c in cri.list_containers(pod.id)] == [third]
    assert_one_shim(cri, pod, shim_binary, [third])
    assert cri.exec_sync(third, ["echo", "still here"]).stdout == "still here\n"

    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
    wait_no_shim(shim_binary, pod.id)


def test_stop_container_grace_period(cri: CriClient, busybox: str, handler: str, shim_binary: str) -> None:
    pod = cri.run_pod("grace", handler)
    polite = cri.run_container(
        pod,
        "polite",
        ["sh", "-c", "trap 'echo got-term; exit 0' TERM; echo ready; while :; do sleep 0.1; done"],
        image=busybox,
    )
    stubborn = cri.run_container(
        pod, "stubborn", ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"], image=busybox
    )
    for cid in (polite, stubborn):  # "ready" is printed once the trap is set
        cri.wait_log(pod, cid, "ready\n")

    # Traps SIGTERM and exits: StopContainer returns well within the grace period, with status 0.
    t0 = time.monotonic()
    cri.stop_container(polite, 10)
    elapsed = time.monotonic() - t0
    st = cri.container_status(polite)[0]
    assert (st.state, st.exit_code) == (EXITED, 0)
    assert elapsed < 5, f"a container that exits on SIGTERM took {elapsed:.1f}s to stop"
    assert cri.wait_log(pod, polite, "got-term\n")

    # Ignores SIGTERM: SIGKILL once the grace period is over, 137.
    grace = 2
    t0 = time.monotonic()
    cri.stop_container(stubborn, grace)
    elapsed = time.monotonic() - t0
    st = cri.container_status(stubborn)[0]
    assert (st.state, st.exit_code) == (EXITED, 137)
    assert grace <= elapsed < grace + 3, f"StopContainer(timeout={grace}) took {elapsed:.2f}s"
    assert st.finished_at - st.started_at >= grace * 10**9

    # A second stop of an exited container is a no-op.
    cri.stop_container(stubborn, grace)
    assert cri.container_status(stubborn)[0].exit_code == 137
    assert cri.pod_status(pod.id)[0].state == READY  # the pod outlives its containers
    assert_one_shim(cri, pod, shim_binary, [])

    for cid in (polite, stubborn):
        cri.remove_container(cid)
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
    wait_no_shim(shim_binary, pod.id)
