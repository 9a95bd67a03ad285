"""``google.protobuf.Any`` with containerd's type URLs.

containerd 1.6 (typeurl v1.0.2) looks type URLs up verbatim, and its registry holds bare
proto full names such as ``containerd.events.TaskExit``. An Any we send with the usual
``type.googleapis.com/`` prefix is accepted on the wire and then silently dropped by every
subscriber (spec §4.1), so :func:`pack` never adds a prefix. Other clients may add one,
so :func:`unpack` accepts both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from podshim.api import (
    cgroups_v1_pb2,
    cgroups_v2_pb2,
    events_pb2,
    podshim_options_pb2,
    runc_legacy_pb2,
    runc_options_pb2,
    runtimeoptions_pb2,
)
from podshim.errdefs import NotFound, ShimError

M = TypeVar("M", bound=Message)

Registry = Mapping[str, type[Message]]


class UnknownTypeURL(NotFound):
    """Same wording as runc-v2: ``type with url X: not found``."""


class UnpackError(ShimError):
    """The Any's value does not decode as its named type (Unknown, as in runc-v2)."""


def type_url(msg: Message | type[Message]) -> str:
    name: str = msg.DESCRIPTOR.full_name
    return name


def type_name(url: str) -> str:
    """The full name in ``url``: everything after the last ``/``, like protobuf's Any."""
    return url.rpartition("/")[2]


def pack(msg: Message) -> any_pb2.Any:
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


def _registry(*classes: type[Message]) -> dict[str, type[Message]]:
    return {cls.DESCRIPTOR.full_name: cls for cls in classes}


OPTION_TYPES: Mapping[str, type[Message]] = _registry(
    runc_options_pb2.Options,
    runc_options_pb2.CheckpointOptions,
    runc_legacy_pb2.RuncOptions,
    runc_legacy_pb2.CreateOptions,
    runc_legacy_pb2.CheckpointOptions,
    runtimeoptions_pb2.Options,
    podshim_options_pb2.Options,
)

EVENT_TYPES: Mapping[str, type[Message]] = _registry(
    events_pb2.TaskCreate,
    events_pb2.TaskStart,
    events_pb2.TaskDelete,
    events_pb2.TaskExit,
    events_pb2.TaskOOM,
    events_pb2.TaskExecAdded,
    events_pb2.TaskExecStarted,
    events_pb2.TaskPaused,
    events_pb2.TaskResumed,
    events_pb2.TaskCheckpointed,
)

# The topic containerd expects for each event type (spec §4.2).
EVENT_TOPICS: Mapping[str, str] = {
    "containerd.events.TaskCreate": "/tasks/create",
    "containerd.events.TaskStart": "/tasks/start",
    "containerd.events.TaskDelete": "/tasks/delete",
    "containerd.events.TaskExit": "/tasks/exit",
    "containerd.events.TaskOOM": "/tasks/oom",
    "containerd.events.TaskExecAdded": "/tasks/exec-added",
    "containerd.events.TaskExecStarted": "/tasks/exec-started",
    "containerd.events.TaskPaused": "/tasks/paused",
    "containerd.events.TaskResumed": "/tasks/resumed",
    "containerd.events.TaskCheckpointed": "/tasks/checkpointed",
}

REGISTRY: Mapping[str, type[Message]] = {
    **OPTION_TYPES,
    **EVENT_TYPES,
    **_registry(
        runc_options_pb2.ProcessDetails,
        runc_legacy_pb2.ProcessDetails,
        cgroups_v1_pb2.Metrics,
        cgroups_v2_pb2.Metrics,
    ),
}


def topic(event: Message) -> str:
    try:
        return EVENT_TOPICS[event.DESCRIPTOR.full_name]
    except KeyError:
        raise UnknownTypeURL(f"type with url {event.DESCRIPTOR.full_name}") from None


def _decode(cls: type[M], value: bytes, url: str) -> M:
    msg = cls()
    try:
        msg.ParseFromString(value)
    except DecodeError as exc:
        raise UnpackError(f"failed to unmarshal {url}: {exc}") from None
    return msg


def unpack(any_msg: any_pb2.Any, registry: Registry = REGISTRY) -> Message:
    """Decode ``any_msg`` as the registered type its URL names (exact URL first, then bare name)."""
    url = any_msg.type_url
    cls = registry.get(url) or registry.get(type_name(url))
    if cls is None:
        raise UnknownTypeURL(f"type with url {url}")
    return _decode(cls, any_msg.value, url)


def unpack_as(any_msg: any_pb2.Any, cls: type[M]) -> M:
    """Decode ``any_msg`` as ``cls``, which its URL must name (with or without a prefix)."""
    url = any_msg.type_url
    if type_name(url) != cls.DESCRIPTOR.full_name:
        raise UnknownTypeURL(f"type with url {url}")
    return _decode(cls, any_msg.value, url)
