"""Runtime options: every form containerd may send, decoded into one ``ShimOptions``.

They arrive on ``start``'s stdin and again in ``CreateTaskRequest.options`` (spec §6):
- ``containerd.runc.v1.Options``: runc-type handlers, and containerd's client tests;
- ``containerd.linux.runc.CreateOptions``: the legacy form some client tests send;
- ``runtimeoptions.v1.Options``: what CRI sends for a non-runc runtime type; its
  ``config_path`` names a TOML file holding our options;
- ``podshim.v1.Options``: our own.

They are the node admin's, the only source of privilege a pod gets (docs/configuration.md,
"Security model"), so they fail closed: an options file that is missing, unreadable, not TOML,
or has an unknown key or a value of the wrong type is an InvalidArgument at Create naming the
file and the key, never a silent fallback to plain runc.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from podshim import errdefs

if TYPE_CHECKING:
    from google.protobuf import any_pb2

_D = TypeVar("_D")


# Isolation modes; a pod may pick one of the handler's ``allowed_isolation`` with podshim.io/isolation.
MODES = ("process", "vm", "host")
DEFAULT_ALLOWED_ISOLATION = ("process", "vm")  # never "host": only an admin's handler enables it

# Fields that are bookkeeping, not options: an options file may not set them.
_NOT_A_KEY = {"toml": False}


@dataclass
class VMSettings:
    memory_mib: int = 0
    vcpus: int = 0
    kernel_path: str = ""
    initrd_path: str = ""
    max_memory_mib: int = 0  # what pod annotations may ask for; 0: no more than memory_mib / vcpus
    max_vcpus: int = 0
    template: bool = True  # clone pod VMs from a template of their shape; False: boot cold
    tcg_tb_size_mib: int = 0  # qemu's translation cache under TCG; 0: qemu.TCG_TB_SIZE_MIB


@dataclass
class HostSettings:
    # Where podshim.io/hostprocess-rootfs-location may point; empty: the annotation is refused.
    allowed_rootfs_locations: list[str] = field(default_factory=list)


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
    allowed_isolation: list[str] = field(default_factory=lambda: list(DEFAULT_ALLOWED_ISOLATION))
    vm: VMSettings = field(default_factory=VMSettings)
    host: HostSettings = field(default_factory=HostSettings)
    config_path: str = field(default="", metadata=_NOT_A_KEY)
    # Where the options came from, for errors that must name it ("" means none were sent).
    source: str = field(default="", metadata=_NOT_A_KEY)
    # Why the options on start's stdin were unusable: Create refuses them rather than run defaults.
    problem: str = field(default="", metadata=_NOT_A_KEY)

    def describe_source(self) -> str:
        return self.source or "the default options (the handler sends no runtime options)"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShimOptions:
        return _from_dict(cls, json.loads(text or "{}"))


def _from_dict(cls: type[_D], data: dict[str, Any]) -> _D:
    """A dataclass from ``asdict`` output; keys it does not know (older or newer files) are dropped."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue
        sub = _dataclass_type(cls, f.name)
        values[f.name] = _from_dict(sub, data[f.name]) if sub is not None else data[f.name]
    return cls(**values)


def _dataclass_type(cls: type, name: str) -> type | None:
    hint = typing.get_type_hints(cls)[name]
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def _merge(opts: ShimOptions, values: dict[str, Any]) -> None:
    """Fields of a protobuf message, by name; fields we do not use (CRIU paths, debug) are ignored."""
    names = {f.name for f in dataclasses.fields(ShimOptions) if f.metadata.get("toml", True)}
    for key, value in values.items():
        if key not in names:
            continue
        current = getattr(opts, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            for sub, sub_value in value.items():
                if hasattr(current, sub):
                    setattr(current, sub, sub_value)
        else:
            setattr(opts, key, value)


def _proto_fields(msg: Any) -> dict[str, Any]:
    """The fields that are set, by proto name (messages become dicts, repeated fields lists)."""
    out: dict[str, Any] = {}
    for fd, value in msg.ListFields():
        if fd.message_type is not None:
            out[fd.name] = _proto_fields(value)
        elif fd.label == fd.LABEL_REPEATED:
            out[fd.name] = list(value)
        else:
            out[fd.name] = value
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
                opts.source = f"handler options file {rm.config_path}"
                apply_file(opts, rm.config_path)
                _check_values(opts)
                return opts
        else:
            raise errdefs.InvalidArgument(f"unsupported runtime options type {raw.type_url}")
    except errdefs.ShimError:
        raise
    except Exception as e:
        raise errdefs.InvalidArgument(f"cannot decode runtime options {raw.type_url}: {e}") from e
    opts.source = f"runtime options {name}"
    _check_values(opts)
    return opts


def apply_file(opts: ShimOptions, path: str) -> None:
    """A handler's options file (CRI's ``ConfigPath``): the keys of ``ShimOptions``, with [vm]
    and [host] tables.  Checked in full before anything runs."""
    import tomllib

    if not os.path.isabs(path):
        # The shim's working directory is the bundle: a relative path would be the client's file.
        raise errdefs.InvalidArgument(f"handler options file {path!r} (ConfigPath) is not an absolute path")
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise errdefs.InvalidArgument(
            f"handler options file {path} (ConfigPath) cannot be read: {e.strerror or e}"
        ) from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise errdefs.InvalidArgument(f"handler options file {path} is not valid TOML: {e}") from e
    _apply_table(opts, table, path, "")


def _apply_table(target: Any, table: dict[str, Any], path: str, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(target) if f.metadata.get("toml", True)}
    hints = typing.get_type_hints(type(target))
    for key, value in table.items():
        name = prefix + key
        if key not in fields:
            known = ", ".join(prefix + k for k in fields)
            raise errdefs.InvalidArgument(
                f"handler options file {path}: unknown key '{name}' (known: {known})"
            )
        want = hints[key]
        sub = getattr(target, key)
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise _wrong_type(path, name, "a table", value)
            _apply_table(sub, value, path, name + ".")
            continue
        if want is bool:
            ok = isinstance(value, bool)
        elif want is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        elif want is str:
            ok = isinstance(value, str)
        else:  # list[str]
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if not ok:
            kinds = {bool: "a boolean", int: "a non-negative integer", str: "a string"}
            raise _wrong_type(path, name, kinds.get(want, "a list of strings"), value)
        setattr(target, key, list(value) if isinstance(value, list) else value)


def _wrong_type(path: str, key: str, want: str, value: object) -> errdefs.InvalidArgument:
    return errdefs.InvalidArgument(f"handler options file {path}: key '{key}' must be {want}, not {value!r}")


def _check_values(opts: ShimOptions) -> None:
    """What the types alone do not say, for every form of options."""

    def bad(key: str, why: str) -> errdefs.InvalidArgument:
        return errdefs.InvalidArgument(f"{opts.describe_source()}: key '{key}' {why}")

    modes = ", ".join(MODES)
    if opts.isolation and opts.isolation not in MODES:
        raise bad("isolation", f"is {opts.isolation!r}; want one of {modes}")
    for mode in opts.allowed_isolation:
        if mode not in MODES:
            raise bad("allowed_isolation", f"has {mode!r}; want a list of {modes}")
    for loc in opts.host.allowed_rootfs_locations:
        if not os.path.isabs(loc) or os.path.normpath(loc) != loc or loc == "/":
            raise bad(
                "host.allowed_rootfs_locations", f"has {loc!r}; want normalised absolute paths other than /"
            )


def decode_stdin(data: bytes) -> ShimOptions:
    """The options on ``start``'s stdin.  The start action must not fail on them (containerd would
    report no error code); a problem is kept for Create to refuse with InvalidArgument."""
    if not data:
        return ShimOptions()
    from google.protobuf import any_pb2

    try:
        return decode(any_pb2.Any.FromString(data))
    except errdefs.ShimError as e:
        return ShimOptions(problem=e.message)
    except Exception as e:
        return ShimOptions(problem=f"cannot decode the runtime options on the shim's stdin: {e}")
