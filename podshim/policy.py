"""What a pod may ask of its handler: the node admin's options decide, the pod's annotations only
choose within them (docs/configuration.md, "Security model").

Pod annotations are written by anyone who may create a pod, and the handler's
``pod_annotations = ["podshim.io/*"]`` passes them through, so nothing read from them grants
anything the handler's options do not allow:

* ``podshim.io/isolation`` picks a mode from ``allowed_isolation`` (default process and vm);
  ``host`` only on a handler whose admin allowed it;
* ``podshim.io/hostprocess-rootfs-location`` must lie under ``host.allowed_rootfs_locations``;
* the VM size annotations stay within ``vm.max_memory_mib`` / ``vm.max_vcpus``
  (``backends/vm/spec.py``).

Refusals are InvalidArgument at the sandbox's Create, before anything is made, and name where
the option lives.
"""

from __future__ import annotations

import os
from typing import Any

from podshim import errdefs, oci
from podshim.options import ShimOptions

# containerd 1.7's CRI names the handler in the spec; 1.6 does not, and the options file does.
RUNTIME_HANDLER = "io.containerd.cri.runtime-handler"


def _where(opts: ShimOptions, spec: dict[str, Any]) -> str:
    handler = oci.of(spec).get(RUNTIME_HANDLER, "")
    return (f"runtime handler '{handler}', " if handler else "") + opts.describe_source()


def isolation(opts: ShimOptions, spec: dict[str, Any]) -> str:
    """The mode a pod (or standalone task) runs in: the handler's own, unless its annotation picks
    another that the handler allows."""
    default = opts.isolation or "process"
    asked = oci.isolation(spec)
    if not asked or asked == default:
        return default  # asking for what the handler gives anyway grants nothing
    if asked not in opts.allowed_isolation:
        allowed = ", ".join(f'"{m}"' for m in opts.allowed_isolation)
        hint = (
            ' Host-process pods need a handler of their own whose admin set isolation = "host".'
            if asked == "host"
            else ""
        )
        raise errdefs.InvalidArgument(
            f"annotation '{oci.ISOLATION}: {asked}' is not allowed by {_where(opts, spec)}: "
            f"allowed_isolation = [{allowed}].{hint}"
        )
    return asked


def host_rootfs_location(opts: ShimOptions, spec: dict[str, Any]) -> str:
    """The directory a host-process container's image is mounted under (its id is appended),
    or "" for the bundle's own ``rootfs``."""
    location = oci.of(spec).get(oci.HOSTPROCESS_ROOTFS_LOCATION, "")
    if not location:
        return ""
    allowed = opts.host.allowed_rootfs_locations
    key = "host.allowed_rootfs_locations"
    what = f"annotation '{oci.HOSTPROCESS_ROOTFS_LOCATION}: {location}'"
    if not allowed:
        raise errdefs.InvalidArgument(f"{what} is not allowed: {_where(opts, spec)} sets no {key}")
    if not os.path.isabs(location) or os.path.normpath(location) != location.rstrip("/"):
        raise errdefs.InvalidArgument(f"{what}: not a normalised absolute path")
    for prefix in allowed:
        if _under(location, prefix) and _under(os.path.realpath(location), os.path.realpath(prefix)):
            return location.rstrip("/")
    raise errdefs.InvalidArgument(f"{what} is not under any of {key} = {allowed} of {_where(opts, spec)}")


def _under(path: str, prefix: str) -> bool:
    path, prefix = path.rstrip("/"), prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/")
