"""Pure logic of the VM backend: the pod VM's parameters, and an OCI spec made fit for the guest.

Parameters come from the handler's options (``ShimOptions.vm``) and may be overridden per pod by
annotations, within the handler's limits: by default the base size itself, so a pod cannot grow
its VM (memory the scheduler never accounted for) unless the admin raised ``vm.max_memory_mib`` /
``vm.max_vcpus``.  Everything is checked before anything is created, so
a bad option is an InvalidArgument with nothing to clean up.

The guest runs runc on a bundle in the pod share.  A spec written for the host names host paths
the guest cannot see; :func:`guest_spec` rewrites it:

* bind mounts of host files and dirs become binds of ``<share>/<cid>/mounts/<n>``, into which the
  backend bind-mounts the host source (9p carries it into the guest);
* ``/dev/shm`` binds (CRI's per-pod shm) become the guest's own ``/dev/shm``: one per VM, which is
  one per pod;
* a network namespace given by a host path (CRI's pinned netns) is dropped, so the container
  shares the guest's root network namespace, where eth0 holds the pod IP.  Namespaces given as
  ``/proc/<pid>/ns/*`` stay: the pids we report are guest pids, so CRI's paths for workloads
  joining the sandbox are right as they are, inside the guest;
* systemd cgroup paths become cgroupfs ones (the guest has no systemd); AppArmor and SELinux
  labels and OCI hooks, all host-side notions, are dropped.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from podshim import errdefs, oci
from podshim.vm import image as vmimage
from podshim.vm import layer as vmlayer

ANN_MEMORY = "podshim.io/vm.memory-mib"
ANN_VCPUS = "podshim.io/vm.vcpus"
MIN_MEMORY_MIB = 128  # Debian's kernel alone takes about 60 MiB of it
DEFAULT_MEMORY_MIB = 256
DEFAULT_VCPUS = 1
MIN_TB_SIZE_MIB = 8
MAX_TB_SIZE_MIB = 1024


@dataclass(frozen=True)
class VMParams:
    memory_mib: int
    vcpus: int
    kernel: str
    initrd: str
    template: bool = True  # clone from the shape's template; False: always boot cold
    tb_size_mib: int = 0  # qemu's translation cache under TCG; 0: the default


def _annotation_int(annotations: Mapping[str, str], key: str) -> int | None:
    raw = annotations.get(key)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise errdefs.InvalidArgument(f"annotation '{key}': '{raw}' is not an integer") from None
    return value


def resolve_params(
    vm: Any,
    annotations: Mapping[str, str],
    locate: Callable[[], vmimage.Image] = vmimage.locate,
    source: str = "the handler's options",
    locate_layer: Callable[[vmimage.Image], vmlayer.Layer] = vmlayer.locate,
) -> VMParams:
    """``vm`` is ``options.VMSettings``; zero fields mean "default".  ``source`` names where the
    limits are set, for the error a pod that asks for more gets.  The initramfs is the image's
    base archive followed by the guest layer (:mod:`podshim.vm.layer`); an ``initrd_path`` option
    must name such a combined archive."""
    memory = int(vm.memory_mib or DEFAULT_MEMORY_MIB)
    vcpus = int(vm.vcpus or DEFAULT_VCPUS)
    max_memory = int(vm.max_memory_mib or memory)
    max_vcpus = int(vm.max_vcpus or vcpus)
    if (m := _annotation_int(annotations, ANN_MEMORY)) is not None:
        if m > max_memory:
            raise errdefs.InvalidArgument(
                f"annotation '{ANN_MEMORY}': {m} MiB exceeds the handler's limit of {max_memory} MiB "
                f"(vm.max_memory_mib in {source})"
            )
        memory = m
    if (v := _annotation_int(annotations, ANN_VCPUS)) is not None:
        if v > max_vcpus:
            raise errdefs.InvalidArgument(
                f"annotation '{ANN_VCPUS}': {v} exceeds the handler's limit of {max_vcpus} "
                f"(vm.max_vcpus in {source})"
            )
        vcpus = v
    if memory < MIN_MEMORY_MIB:
        raise errdefs.InvalidArgument(f"VM memory {memory} MiB is below the minimum of {MIN_MEMORY_MIB} MiB")
    if vcpus < 1:
        raise errdefs.InvalidArgument(f"VM vCPUs must be at least 1, not {vcpus}")
    kernel, initrd = str(vm.kernel_path or ""), str(vm.initrd_path or "")
    if not kernel or not initrd:
        try:
            img = locate()
            kernel, initrd = kernel or img.kernel, initrd or locate_layer(img).initrd
        except vmimage.ImageError as e:
            raise errdefs.InvalidArgument(f"no VM image: {e}") from e
    for what, path in (("kernel", kernel), ("initramfs", initrd)):
        if not os.path.isfile(path):
            raise errdefs.InvalidArgument(f"VM {what} {path} does not exist")
    tb_size = int(getattr(vm, "tcg_tb_size_mib", 0) or 0)
    if tb_size and not MIN_TB_SIZE_MIB <= tb_size <= MAX_TB_SIZE_MIB:
        raise errdefs.InvalidArgument(
            f"vm.tcg_tb_size_mib {tb_size} is outside [{MIN_TB_SIZE_MIB}, {MAX_TB_SIZE_MIB}] ({source})"
        )
    return VMParams(memory, vcpus, kernel, initrd, bool(getattr(vm, "template", True)), tb_size)


# -- the guest's spec -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bind:
    """A host path to bind-mount at ``<share>/<cid>/<name>`` before the guest creates the container."""

    source: str
    name: str
    is_dir: bool


def _is_bind(m: Mapping[str, Any]) -> bool:
    opts = m.get("options") or []
    return m.get("type") == "bind" or "bind" in opts or "rbind" in opts


def guest_spec(
    spec: dict[str, Any], guest_dir: str, is_dir: Callable[[str], bool] = os.path.isdir
) -> tuple[dict[str, Any], list[Bind]]:
    """The spec the guest's runc gets for a bundle at ``guest_dir``, and the binds it needs."""
    out = copy.deepcopy(spec)
    binds: list[Bind] = []
    out.setdefault("root", {})["path"] = "rootfs"
    mounts = []
    for m in out.get("mounts") or []:
        m = dict(m)
        src = str(m.get("source") or "")
        if _is_bind(m) and src.startswith("/"):
            if m.get("destination") == "/dev/shm":
                m["source"] = "/dev/shm"
            else:
                name = f"mounts/{len(binds)}"
                binds.append(Bind(src, name, is_dir(src)))
                m["source"] = f"{guest_dir}/{name}"
        mounts.append(m)
    if "mounts" in out:
        out["mounts"] = mounts
    linux = out.get("linux")
    if isinstance(linux, dict):
        namespaces = []
        for ns in linux.get("namespaces") or []:
            ns = dict(ns)
            path = str(ns.get("path") or "")
            if path and not path.startswith("/proc/"):
                if ns.get("type") == "network":
                    continue  # join the guest's root netns, where the pod's interface is
                ns.pop("path")
            namespaces.append(ns)
        if "namespaces" in linux:
            linux["namespaces"] = namespaces
        if "cgroupsPath" in linux:
            linux["cgroupsPath"] = guest_cgroups_path(linux)
        linux.pop("mountLabel", None)
        linux.pop("seccompNotify", None)
    proc = out.get("process")
    if isinstance(proc, dict):
        proc.pop("apparmorProfile", None)
        proc.pop("selinuxLabel", None)
    out.pop("hooks", None)
    return out, binds


def guest_cgroups_path(linux: Mapping[str, Any]) -> str:
    """Where a container's cgroup goes in the guest: systemd's ``slice:prefix:name`` (the guest
    has no systemd) as a cgroupfs path, others as they are ("" for the runtime's default)."""
    cg = str(linux.get("cgroupsPath") or "")
    if ":" in cg:
        return "/podshim/" + cg.rsplit(":", 1)[-1]
    return cg


HELD_NAMESPACES = ("ipc", "uts", "pid")


def hold_args(spec: Mapping[str, Any], has_stdio: bool) -> dict[str, Any] | None:
    """The agent's ``hold`` arguments for a CRI sandbox, which the agent holds without a pause
    container (:mod:`podshim.guest.holder`); None for anything it could not hold faithfully: not
    a sandbox, stdio to carry, or a namespace beyond those it holds (a user namespace, say)."""
    ann = spec.get("annotations") or {}
    if ann.get(oci.CONTAINER_TYPE) != oci.ContainerType.SANDBOX.value or has_stdio:
        return None
    linux = spec.get("linux") or {}
    process = spec.get("process") or {}
    namespaces = []
    for ns in linux.get("namespaces") or []:
        kind = ns.get("type")
        if kind in ("mount", "cgroup", "network"):
            continue  # nobody joins the sandbox's mount or cgroup namespace; the VM's network
        if kind not in HELD_NAMESPACES or ns.get("path"):
            return None
        namespaces.append(kind)
    user = process.get("user") or {}
    args: dict[str, Any] = {
        "namespaces": namespaces,
        "hostname": str(spec.get("hostname") or ""),
        "sysctl": dict(linux.get("sysctl") or {}),
        "uid": int(user.get("uid") or 0),
        "gid": int(user.get("gid") or 0),
        "cgroups_path": guest_cgroups_path(linux),
    }
    if process.get("oomScoreAdj") is not None:
        args["oom_score_adj"] = int(process["oomScoreAdj"])
    return args


def guest_process(process: dict[str, Any]) -> dict[str, Any]:
    """An exec's process spec, with the host-only labels dropped."""
    out = dict(process)
    out.pop("apparmorProfile", None)
    out.pop("selinuxLabel", None)
    return out
