"""Pods through CRI, timed step by step: what the pod scenarios share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from cri.client import Pod

from bench.env import RUNTIMES, Env

# Writes once, then stays up: its first output marks "started and running", and the pod keeps a
# live container for the memory, RPC and exec scenarios.
SLEEPER = ["sh", "-c", "echo ready && exec sleep 3600"]
READY = "ready"


def log_path(pod: Pod, name: str) -> Path:
    return Path(pod.config.log_directory) / f"{name}_0.log"


def wait_output(path: Path, text: str, timeout: float = 60.0) -> None:
    """Poll the CRI log file itself: cheaper than a ContainerStatus call per poll, and it is
    exactly when a log reader (kubectl logs) could see the line."""
    needle = text.encode()
    deadline = time.monotonic() + timeout
    while True:
        try:
            if needle in path.read_bytes():
                return
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {text!r} in {path} within {timeout}s")
        time.sleep(0.002)


@dataclass
class PodTiming:
    run_pod: float = 0.0  # RunPodSandbox
    containers: float = 0.0  # CreateContainer + StartContainer, all of them
    first_output: float = 0.0  # from the last StartContainer's return to every container's line
    total: float = 0.0
    container_ids: list[str] = field(default_factory=list)


def start_pod(
    env: Env, runtime: str, name: str, containers: int = 1, wait: bool = True
) -> tuple[Pod, PodTiming]:
    """RunPodSandbox, then create and start `containers` SLEEPERs one after another (as the
    kubelet starts a pod's regular containers), then wait for each one's first output."""
    t = PodTiming()
    t0 = time.perf_counter()
    pod = env.cri.run_pod(name, RUNTIMES[runtime].handler)
    t1 = time.perf_counter()
    names = [f"c{i}" for i in range(containers)]
    for n in names:
        t.container_ids.append(env.cri.run_container(pod, n, SLEEPER, image=env.image))
    t2 = time.perf_counter()
    if wait:
        for n in names:
            wait_output(log_path(pod, n), READY)
    t3 = time.perf_counter()
    t.run_pod, t.containers, t.first_output, t.total = t1 - t0, t2 - t1, t3 - t2, t3 - t0
    return pod, t


def add_containers(env: Env, pod: Pod, count: int) -> list[str]:
    start = len(pod.containers)
    ids = []
    for i in range(start, start + count):
        ids.append(env.cri.run_container(pod, f"c{i}", SLEEPER, image=env.image))
        wait_output(log_path(pod, f"c{i}"), READY)
    return ids


def remove_pod(env: Env, pod: Pod) -> float:
    """StopPodSandbox + RemovePodSandbox; seconds. CRI kills the containers (SIGKILL, grace 0)."""
    t0 = time.perf_counter()
    env.cri.stop_pod(pod.id)
    env.cri.remove_pod(pod.id)
    return time.perf_counter() - t0
