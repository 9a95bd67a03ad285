"""What podshim reads from an OCI spec: CRI's annotations (spec §6) and our own ``podshim.io/*``."""

from __future__ import annotations

import enum
from typing import Any

from podshim import errdefs

CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
RUNC_GROUP = "io.containerd.runc.v2.group"

ISOLATION = "podshim.io/isolation"
HOSTPROCESS_ROOTFS_LOCATION = "podshim.io/hostprocess-rootfs-location"
HOSTPROCESS_INHERIT_USER = "podshim.io/hostprocess-inherit-user"


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
    """Which shim serves a container: one per pod, else one per container (spec §1.3)."""
    ann = of(spec)
    return ann.get(RUNC_GROUP) or ann.get(SANDBOX_ID) or container_id
