"""What podshim reads from an OCI spec: CRI's annotations (spec §6) and our own ``podshim.io/*``."""

from __future__ import annotations

import enum
from typing import Any

from podshim import errdefs, ids

CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
RUNC_GROUP = "io.containerd.runc.v2.group"

ISOLATION = "podshim.io/isolation"
HOSTPROCESS_ROOTFS_LOCATION = "podshim.io/hostprocess-rootfs-location"
HOSTPROCESS_INHERIT_USER = "podshim.io/hostprocess-inherit-user"
# A container that asks to be a host process (Windows: microsoft.com/hostprocess-container).
HOST_PROCESS = "podshim.io/host-process"
# What a host-process pod hands down to every container (the seed's pass-through list).
HOSTPROCESS_PASS_THROUGH = (HOSTPROCESS_INHERIT_USER, HOSTPROCESS_ROOTFS_LOCATION)


class ContainerType(enum.Enum):
    NONE = ""
    SANDBOX = "sandbox"
    CONTAINER = "container"


def of(spec: dict[str, Any]) -> dict[str, str]:
    return dict(spec.get("annotations") or {})


def sandbox_type_and_id(spec: dict[str, Any]) -> tuple[ContainerType, str]:
    """The seed's GetSandboxTypeAndID: both annotations or neither."""
    ann = of(spec)
    ct, sid = ann.get(CONTAINER_TYPE, ""), ann.get(SANDBOX_ID, "")
    try:
        kind = ContainerType(ct)
    except ValueError:
        raise errdefs.InvalidArgument(f"invalid '{CONTAINER_TYPE}': '{ct}'") from None
    if kind is ContainerType.NONE and sid:
        raise errdefs.InvalidArgument(f"'{SANDBOX_ID}' is set without '{CONTAINER_TYPE}'")
    if kind is not ContainerType.NONE and not sid:
        raise errdefs.InvalidArgument(f"'{CONTAINER_TYPE}' is '{ct}' but '{SANDBOX_ID}' is missing")
    return kind, sid


def grouping_key(spec: dict[str, Any], container_id: str) -> str:
    """Which shim serves a container: one per pod, else one per container (spec §1.3).

    It names the shim's socket and a VM pod's run dir, so it is an identifier like any task id."""
    ann = of(spec)
    for name in (RUNC_GROUP, SANDBOX_ID):
        if ann.get(name):
            return ids.check(f"annotation '{name}':", ann[name])
    return ids.check_task_id(container_id)


def isolation(spec: dict[str, Any]) -> str:
    return of(spec).get(ISOLATION, "")


def host_process_choice(spec: dict[str, Any]) -> bool | None:
    """What a container says about being a host process: True if it asks to be one (itself, or
    through its pod's ``isolation: host``, which CRI copies into every container), False if it
    opts out, None if it says nothing (it then is what its pod is)."""
    ann = of(spec)
    flag = ann.get(HOST_PROCESS, "").lower()
    if flag == "true" or ann.get(ISOLATION, "") == "host":
        return True
    if flag == "false":
        return False
    return None


def pass_through(sandbox: dict[str, Any], container: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Copy sandbox annotations the container does not set itself (the seed's
    SandboxAnnotationsPassThrough): Kubernetes gives annotations to RunPodSandbox only."""
    src = of(sandbox)
    dst = container.setdefault("annotations", {})
    for key in keys:
        if key in src and key not in dst:
            dst[key] = src[key]


def joins_or_shares_pid_namespace(spec: dict[str, Any]) -> bool:
    """No pid namespace of its own (the host's, or one joined by path, as CRI pods sharing the
    sandbox's): its init's exit does not take its descendants with it (spec §5.4)."""
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "pid":
            return bool(ns.get("path"))
    return True
