from __future__ import annotations

import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message

from podshim import errdefs
from podshim.api import (
    cgroups_v1_pb2,
    cgroups_v2_pb2,
    events_pb2,
    podshim_options_pb2,
    runc_options_pb2,
    runtimeoptions_pb2,
    task_pb2,
    typeurls,
)
from podshim.errdefs import Code


def test_pack_uses_bare_full_name() -> None:
    packed = typeurls.pack(events_pb2.TaskExit(container_id="c", id="c", pid=7, exit_status=137))
    assert packed.type_url == "containerd.events.TaskExit"
    assert events_pb2.TaskExit.FromString(packed.value).exit_status == 137


@pytest.mark.parametrize(
    ("msg", "url"),
    [
        (events_pb2.TaskOOM(container_id="x"), "containerd.events.TaskOOM"),
        (runc_options_pb2.Options(binary_name="/usr/sbin/runc"), "containerd.runc.v1.Options"),
        (runc_options_pb2.ProcessDetails(exec_id="e"), "containerd.runc.v1.ProcessDetails"),
        (runtimeoptions_pb2.Options(type_url="t", config_path="/p"), "runtimeoptions.v1.Options"),
        (cgroups_v1_pb2.Metrics(), "io.containerd.cgroups.v1.Metrics"),
        (cgroups_v2_pb2.Metrics(), "io.containerd.cgroups.v2.Metrics"),
        (podshim_options_pb2.Options(isolation="vm"), "podshim.v1.Options"),
    ],
)
def test_round_trip_bare_and_prefixed(msg: Message, url: str) -> None:
    packed = typeurls.pack(msg)
    assert packed.type_url == url == typeurls.type_url(msg) == typeurls.type_url(type(msg))
    assert typeurls.unpack(packed) == msg
    prefixed = any_pb2.Any(type_url="type.googleapis.com/" + url, value=packed.value)
    assert typeurls.unpack(prefixed) == msg
    assert typeurls.unpack_as(prefixed, type(msg)) == msg


def test_runc_options_wire_compat() -> None:
    # What CRI sent for {"binary_name":"/usr/sbin/runc"} (spec §6): field 6, string.
    opts = runc_options_pb2.Options.FromString(b"\x32\x0e/usr/sbin/runc")
    assert opts.binary_name == "/usr/sbin/runc"
    assert runc_options_pb2.Options(systemd_cgroup=True).SerializeToString() == b"\x48\x01"


def test_unknown_type_url_is_not_found_like_runc() -> None:
    with pytest.raises(errdefs.NotFound) as info:
        typeurls.unpack(any_pb2.Any(type_url="io.example.Nope", value=b""), typeurls.OPTION_TYPES)
    assert info.value.code == Code.NOT_FOUND
    assert info.value.message == "type with url io.example.Nope: not found"
    # Restricting the registry: events are not options.
    with pytest.raises(typeurls.UnknownTypeURL):
        typeurls.unpack(typeurls.pack(events_pb2.TaskOOM()), typeurls.OPTION_TYPES)


def test_unpack_as_checks_the_name() -> None:
    with pytest.raises(typeurls.UnknownTypeURL):
        typeurls.unpack_as(typeurls.pack(events_pb2.TaskOOM()), runc_options_pb2.Options)


def test_undecodable_value() -> None:
    bad = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\x32\xff")
    with pytest.raises(typeurls.UnpackError) as info:
        typeurls.unpack(bad)
    assert info.value.code == Code.UNKNOWN
    assert "containerd.runc.v1.Options" in info.value.message


def test_registries_cover_every_event_and_topic() -> None:
    event_names = {d.full_name for d in events_pb2.DESCRIPTOR.message_types_by_name.values()} - {
        "containerd.events.TaskIO"
    }
    assert set(typeurls.EVENT_TYPES) == event_names == set(typeurls.EVENT_TOPICS)
    assert typeurls.topic(events_pb2.TaskExecStarted()) == "/tasks/exec-started"
    assert all(t.startswith("/tasks/") for t in typeurls.EVENT_TOPICS.values())
    with pytest.raises(typeurls.UnknownTypeURL):
        typeurls.topic(task_pb2.StateRequest())
    for name, cls in typeurls.REGISTRY.items():
        assert cls.DESCRIPTOR.full_name == name


def test_task_status_enum_values() -> None:
    from podshim.api import task_types_pb2 as tt

    assert [tt.UNKNOWN, tt.CREATED, tt.RUNNING, tt.STOPPED, tt.PAUSED, tt.PAUSING] == [0, 1, 2, 3, 4, 5]
    assert task_pb2.StateResponse(status=tt.STOPPED).SerializeToString() == b"\x20\x03"
