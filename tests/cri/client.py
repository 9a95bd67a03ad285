"""A small CRI v1 client (gRPC over containerd's unix socket) with the helpers the tests need.

The message classes come from stubs generated at setup time by scripts/gen-cri-stubs.sh into
build/cri/py (git-ignored); the package's __init__.py puts that dir on sys.path.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc  # type: ignore[import-untyped]
from google.protobuf.message import Message
from k8s_cri.runtime.v1 import api_pb2 as cri

M = TypeVar("M", bound=Message)

# The two services; their methods are called by name (/runtime.v1.<service>/<method>), which keeps
# every call typed by the messages' .pyi stubs, unlike the untyped generated api_pb2_grpc.
RUNTIME = "runtime.v1.RuntimeService"
IMAGES = "runtime.v1.ImageService"

POD_NAMESPACE = "podshim-test"

# Container states (ContainerState enum) and pod states (PodSandboxState enum), by name.
RUNNING = cri.CONTAINER_RUNNING
EXITED = cri.CONTAINER_EXITED
READY = cri.SANDBOX_READY
NOTREADY = cri.SANDBOX_NOTREADY


def state_name(state: int) -> str:
    return str(cri.ContainerState.Name(state))


def pod_state_name(state: int) -> str:
    return str(cri.PodSandboxState.Name(state))


@dataclass
class Pod:
    id: str
    name: str
    handler: str
    config: cri.PodSandboxConfig
    # containers created through the client in this pod, in creation order: {id: name}
    containers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExecResult:
    stdout: str
    stderr: str
    exit_code: int


class CriClient:
    """RuntimeService and ImageService on one channel; every RPC with a deadline."""

    def __init__(self, address: str, *, cgroup_parent: str, log_root: Path, timeout: float = 30.0) -> None:
        self.address = address
        self.cgroup_parent = cgroup_parent
        self.log_root = log_root
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{address}")
        self.pods: dict[str, Pod] = {}  # every pod this client ran, removed or not

    def close(self) -> None:
        self._channel.close()

    def _call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        timeout: float | None = None,
    ) -> M:
        rpc = self._channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        response = rpc(request, timeout=timeout or self.timeout)
        assert isinstance(response, response_type)
        return response

    # -- service-level --------------------------------------------------------------------------

    def version(self) -> cri.VersionResponse:
        return self._call(RUNTIME, "Version", cri.VersionRequest(), cri.VersionResponse)

    def status(self) -> cri.StatusResponse:
        return self._call(RUNTIME, "Status", cri.StatusRequest(), cri.StatusResponse)

    def image_status(self, ref: str) -> cri.Image | None:
        resp = self._call(
            IMAGES,
            "ImageStatus",
            cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)),
            cri.ImageStatusResponse,
        )
        return resp.image if resp.HasField("image") else None

    # -- pods -----------------------------------------------------------------------------------

    def pod_config(
        self,
        name: str,
        *,
        annotations: Mapping[str, str] = {},
        share_pid: bool = False,
        attempt: int = 0,
        host: bool = False,
    ) -> cri.PodSandboxConfig:
        uid = secrets.token_hex(8)
        log_dir = self.log_root / f"{POD_NAMESPACE}_{name}_{uid}"
        log_dir.mkdir(parents=True, exist_ok=True)
        return cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace=POD_NAMESPACE, attempt=attempt),
            hostname=name,
            log_directory=str(log_dir),
            labels={"podshim.test/suite": "cri"},
            annotations=dict(annotations),
            linux=cri.LinuxPodSandboxConfig(
                cgroup_parent=self.cgroup_parent,
                security_context=cri.LinuxSandboxSecurityContext(
                    namespace_options=_ns_options(share_pid, host)
                ),
            ),
        )

    def run_pod(
        self,
        name: str,
        handler: str,
        annotations: Mapping[str, str] = {},
        *,
        share_pid: bool = False,
        host: bool = False,
    ) -> Pod:
        """RunPodSandbox; by default with the kubelet's defaults (pid namespace per container).
        host=True: hostNetwork, hostPID and hostIPC, as a HostProcess pod has them."""
        config = self.pod_config(name, annotations=annotations, share_pid=share_pid, host=host)
        resp = self._call(
            RUNTIME,
            "RunPodSandbox",
            cri.RunPodSandboxRequest(config=config, runtime_handler=handler),
            cri.RunPodSandboxResponse,
        )
        pod = Pod(id=resp.pod_sandbox_id, name=name, handler=handler, config=config)
        self.pods[pod.id] = pod
        return pod

    def pod_status(self, pod_id: str) -> tuple[cri.PodSandboxStatus, dict[str, Any]]:
        """The status and the parsed verbose `info` (pid, runtimeHandler, config, …)."""
        resp = self._call(
            RUNTIME,
            "PodSandboxStatus",
            cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True),
            cri.PodSandboxStatusResponse,
        )
        info = json.loads(resp.info["info"]) if "info" in resp.info else {}
        return resp.status, info

    def sandbox_pid(self, pod_id: str) -> int:
        return int(self.pod_status(pod_id)[1]["pid"])

    def stop_pod(self, pod_id: str) -> None:
        self._call(
            RUNTIME,
            "StopPodSandbox",
            cri.StopPodSandboxRequest(pod_sandbox_id=pod_id),
            cri.StopPodSandboxResponse,
        )

    def remove_pod(self, pod_id: str) -> None:
        self._call(
            RUNTIME,
            "RemovePodSandbox",
            cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
            cri.RemovePodSandboxResponse,
        )

    def list_pods(self) -> list[cri.PodSandbox]:
        return list(
            self._call(
                RUNTIME, "ListPodSandbox", cri.ListPodSandboxRequest(), cri.ListPodSandboxResponse
            ).items
        )

    def wait_pod_state(self, pod_id: str, state: int, timeout: float = 30.0) -> cri.PodSandboxStatus:
        return _wait(
            lambda: self.pod_status(pod_id)[0],
            lambda s: s.state == state,
            timeout,
            f"pod {pod_id[:12]} to be {pod_state_name(state)}",
            lambda s: pod_state_name(s.state),
        )

    # -- containers -----------------------------------------------------------------------------

    def create_container(
        self,
        pod: Pod,
        name: str,
        command: Sequence[str],
        *,
        image: str,
        attempt: int = 0,
        annotations: Mapping[str, str] = {},
        share_pid: bool | None = None,
    ) -> str:
        """CreateContainer with the pod's namespace options (as the kubelet sends them)."""
        pod_ns = pod.config.linux.security_context.namespace_options
        if share_pid is None:
            share_pid = pod_ns.pid == cri.POD
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name, attempt=attempt),
            image=cri.ImageSpec(image=image),
            command=list(command),
            log_path=f"{name}_{attempt}.log",
            annotations=dict(annotations),
            linux=cri.LinuxContainerConfig(
                security_context=cri.LinuxContainerSecurityContext(
                    namespace_options=_ns_options(share_pid, pod_ns.network == cri.NODE)
                )
            ),
        )
        resp = self._call(
            RUNTIME,
            "CreateContainer",
            cri.CreateContainerRequest(pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config),
            cri.CreateContainerResponse,
        )
        pod.containers[resp.container_id] = name
        return resp.container_id

    def start_container(self, container_id: str) -> None:
        self._call(
            RUNTIME,
            "StartContainer",
            cri.StartContainerRequest(container_id=container_id),
            cri.StartContainerResponse,
        )

    def run_container(
        self,
        pod: Pod,
        name: str,
        command: Sequence[str],
        *,
        image: str,
        attempt: int = 0,
        annotations: Mapping[str, str] = {},
    ) -> str:
        """Create and start; returns the container id."""
        cid = self.create_container(pod, name, command, image=image, attempt=attempt, annotations=annotations)
        self.start_container(cid)
        return cid

    def stop_container(self, container_id: str, timeout: int) -> None:
        # The RPC outlives the grace period: give it that much on top of the usual deadline.
        self._call(
            RUNTIME,
            "StopContainer",
            cri.StopContainerRequest(container_id=container_id, timeout=timeout),
            cri.StopContainerResponse,
            timeout=self.timeout + timeout,
        )

    def remove_container(self, container_id: str) -> None:
        self._call(
            RUNTIME,
            "RemoveContainer",
            cri.RemoveContainerRequest(container_id=container_id),
            cri.RemoveContainerResponse,
        )

    def container_status(self, container_id: str) -> tuple[cri.ContainerStatus, dict[str, Any]]:
        resp = self._call(
            RUNTIME,
            "ContainerStatus",
            cri.ContainerStatusRequest(container_id=container_id, verbose=True),
            cri.ContainerStatusResponse,
        )
        info = json.loads(resp.info["info"]) if "info" in resp.info else {}
        return resp.status, info

    def container_pid(self, container_id: str) -> int:
        return int(self.container_status(container_id)[1]["pid"])

    def list_containers(self, pod_id: str = "") -> list[cri.Container]:
        flt = cri.ContainerFilter(pod_sandbox_id=pod_id)
        return list(
            self._call(
                RUNTIME,
                "ListContainers",
                cri.ListContainersRequest(filter=flt),
                cri.ListContainersResponse,
            ).containers
        )

    def wait_container_state(
        self, container_id: str, state: int, timeout: float = 30.0
    ) -> cri.ContainerStatus:
        return _wait(
            lambda: self.container_status(container_id)[0],
            lambda s: s.state == state,
            timeout,
            f"container {container_id[:12]} to be {state_name(state)}",
            lambda s: f"{state_name(s.state)} exit={s.exit_code} {s.reason} {s.message}",
        )

    def exec_sync(self, container_id: str, cmd: Sequence[str], timeout: int = 0) -> ExecResult:
        resp = self._call(
            RUNTIME,
            "ExecSync",
            cri.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout),
            cri.ExecSyncResponse,
            timeout=self.timeout + timeout,
        )
        return ExecResult(
            resp.stdout.decode(errors="replace"), resp.stderr.decode(errors="replace"), resp.exit_code
        )

    def container_log(self, pod: Pod, container_id: str) -> str:
        """The container's log file with the CRI prefixes (time, stream, tag) stripped."""
        name = pod.containers[container_id]
        status, _ = self.container_status(container_id)
        path = Path(pod.config.log_directory) / f"{name}_{status.metadata.attempt}.log"
        try:
            lines = path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "".join(
            line.split(" ", 3)[3] + ("\n" if line.split(" ", 3)[2] == "F" else "")
            for line in lines
            if line.count(" ") >= 3
        )

    def wait_log(self, pod: Pod, container_id: str, text: str, timeout: float = 15.0) -> str:
        return _wait(
            lambda: self.container_log(pod, container_id),
            lambda log: text in log,
            timeout,
            f"{text!r} in the log of {pod.containers[container_id]}",
            lambda log: repr(log[-300:]),
        )

    # -- clean-up -------------------------------------------------------------------------------

    def known_objects(self, pod_ids: Iterable[str]) -> frozenset[str]:
        """The given pods, and their containers, that CRI still knows about."""
        wanted = set(pod_ids)
        found = {
            f"pod {p.id} ({p.metadata.name}, {pod_state_name(p.state)})"
            for p in self.list_pods()
            if p.id in wanted
        }
        found |= {
            f"container {c.id} ({c.metadata.name}, {state_name(c.state)})"
            for c in self.list_containers()
            if c.pod_sandbox_id in wanted
        }
        return frozenset(found)

    def force_remove_pods(self, pod_ids: Iterable[str]) -> list[str]:
        """Stop and remove pods (and so their containers) through CRI; returns the errors."""
        errors: list[str] = []
        existing = {p.id for p in self.list_pods()}
        for pid in pod_ids:
            if pid not in existing:
                continue
            for step in (self.stop_pod, self.remove_pod):
                try:
                    step(pid)
                except grpc.RpcError as e:
                    errors.append(f"{step.__name__}({pid[:12]}): {e.code()} {e.details()}")
        return errors


def _ns_options(share_pid: bool, host: bool = False) -> cri.NamespaceOption:
    if host:
        return cri.NamespaceOption(network=cri.NODE, ipc=cri.NODE, pid=cri.NODE)
    return cri.NamespaceOption(network=cri.POD, ipc=cri.POD, pid=cri.POD if share_pid else cri.CONTAINER)


T = TypeVar("T")


def _wait(
    get: Callable[[], T], ok: Callable[[T], bool], timeout: float, what: str, show: Callable[[T], str]
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {show(value)})")
        time.sleep(0.05)


def rpc_error(fn: Callable[[], object]) -> grpc.RpcError:
    """Run `fn`, which must fail with a gRPC error, and return that error."""
    try:
        fn()
    except grpc.RpcError as e:
        return e
    raise AssertionError("the RPC succeeded, but it should have failed")
