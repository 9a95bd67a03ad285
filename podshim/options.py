"""Runtime options: every form containerd may send, decoded into one ``ShimOptions``.

They arrive on ``start``'s stdin and again in ``CreateTaskRequest.options`` (spec §6):
- ``containerd.runc.v1.Options``: runc-type handlers, and containerd's client tests;
- ``containerd.linux.runc.CreateOptions``: the legacy form some client tests send;
- ``runtimeoptions.v1.Options``: what CRI sends for a non-runc runtime type; its
  ``config_path`` names a TOML file holding our options;
- ``podshim.v1.Options``: our own.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from podshim import errdefs

if TYPE_CHECKING:
    from google.protobuf import any_pb2


@dataclass
class VMSettings:
    memory_mib: int = 0
    vcpus: int = 0
    kernel_path: str = ""
    initrd_path: str = ""
    max_memory_mib: int = 0  # limits on what pod annotations may ask for
    max_vcpus: int = 0


@dataclass
class ShimOptions:
    binary_name: str = ""
    root: str = ""
    systemd_cgroup: bool = False
    shim_cgroup: str = ""
    io_uid: int = 0
    io_gid: int = 0
    no_pivot_root: bool = False
    no_new_keyring: bool = False
    isolation: str = ""
    vm: VMSettings = field(default_factory=VMSettings)
    config_path: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShimOptions:
        data = json.loads(text or "{}")
        vm = VMSettings(**data.pop("vm", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(vm=vm, **{k: v for k, v in data.items() if k in known})


def _merge(opts: ShimOptions, values: dict[str, Any]) -> None:
    names = {f.name for f in dataclasses.fields(ShimOptions)}
    for key, value in values.items():
        if key == "vm" and isinstance(value, dict):
            for vk, vv in value.items():
                if hasattr(opts.vm, vk):
                    setattr(opts.vm, vk, vv)
        elif key in names:
            setattr(opts, key, value)


def _proto_fields(msg: Any) -> dict[str, Any]:
    """The fields that are set, by proto name (messages become dicts)."""
    out: dict[str, Any] = {}
    for fd, value in msg.ListFields():
        out[fd.name] = _proto_fields(value) if fd.message_type is not None else value
    return out


def _bare(type_url: str) -> str:
    return type_url.rsplit("/", 1)[-1]


def decode(raw: any_pb2.Any | None) -> ShimOptions:
    opts = ShimOptions()
    if raw is None or not raw.type_url:
        return opts
    from podshim.api import podshim_options_pb2, runc_legacy_pb2, runc_options_pb2, runtimeoptions_pb2

    name = _bare(raw.type_url)
    try:
        if name == "containerd.runc.v1.Options":
            m = runc_options_pb2.Options.FromString(raw.value)
            _merge(opts, _proto_fields(m))
        elif name == "containerd.linux.runc.CreateOptions":
            lm = runc_legacy_pb2.CreateOptions.FromString(raw.value)
            _merge(opts, _proto_fields(lm))
        elif name == "podshim.v1.Options":
            pm = podshim_options_pb2.Options.FromString(raw.value)
            _merge(opts, _proto_fields(pm))
        elif name == "runtimeoptions.v1.Options":
            rm = runtimeoptions_pb2.Options.FromString(raw.value)
            if rm.config_path:
                opts.config_path = rm.config_path
                _merge(opts, load_toml(rm.config_path))
        else:
            raise errdefs.InvalidArgument(f"unsupported runtime options type {raw.type_url}")
    except errdefs.ShimError:
        raise
    except Exception as e:
        raise errdefs.InvalidArgument(f"cannot decode runtime options {raw.type_url}: {e}") from e
    return opts


def load_toml(path: str) -> dict[str, Any]:
    """A handler's options file: the same keys as podshim.v1.Options, with a [vm] table."""
    import tomllib

    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        return tomllib.load(f)


def decode_stdin(data: bytes) -> ShimOptions:
    if not data:
        return ShimOptions()
    from google.protobuf import any_pb2

    try:
        raw = any_pb2.Any.FromString(data)
    except Exception:
        return ShimOptions()
    try:
        return decode(raw)
    except errdefs.ShimError:
        return ShimOptions()
