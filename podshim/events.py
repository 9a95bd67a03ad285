"""Task events: their topics and messages (spec §4.2), and the publisher they go to.

Builders return ``(topic, message)`` so a call site reads as the event it publishes.  The
publisher is one FIFO queue: the order of ``publish`` calls is the order containerd sees.
"""

from __future__ import annotations

from typing import Protocol

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from podshim.api import events_pb2, types_pb2
from podshim.system.mounts import Mount

Event = tuple[str, Message]


class Publisher(Protocol):
    def publish(self, topic: str, event: Message) -> None: ...


def timestamp(at: float | None) -> Timestamp | None:
    """A unix time as a Timestamp; None (not exited) stays absent, which Go reads as zero time."""
    if at is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(at * 1e9))
    return ts


class task_events:
    DELETE_TOPIC = "/tasks/delete"
    @staticmethod
    def create(
        container_id: str,
        bundle: str,
        rootfs: list[Mount],
        stdin: str,
        stdout: str,
        stderr: str,
        terminal: bool,
        pid: int,
    ) -> Event:
        return "/tasks/create", events_pb2.TaskCreate(
            container_id=container_id,
            bundle=bundle,
            rootfs=[types_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options)
                    for m in rootfs],
            io=events_pb2.TaskIO(stdin=stdin, stdout=stdout, stderr=stderr, terminal=terminal),
            pid=pid,
        )

    @staticmethod
    def start(container_id: str, pid: int) -> Event:
        return "/tasks/start", events_pb2.TaskStart(container_id=container_id, pid=pid)

    @staticmethod
    def exit(container_id: str, id: str, pid: int, status: int, at: float | None) -> Event:
        return "/tasks/exit", events_pb2.TaskExit(
            container_id=container_id, id=id, pid=pid, exit_status=status, exited_at=timestamp(at)
        )

    @staticmethod
    def delete(container_id: str, pid: int, status: int, at: float | None) -> Event:
        return task_events.DELETE_TOPIC, events_pb2.TaskDelete(
            container_id=container_id, pid=pid, exit_status=status, exited_at=timestamp(at)
        )

    @staticmethod
    def oom(container_id: str) -> Event:
        return "/tasks/oom", events_pb2.TaskOOM(container_id=container_id)

    @staticmethod
    def exec_added(container_id: str, exec_id: str) -> Event:
        return "/tasks/exec-added", events_pb2.TaskExecAdded(container_id=container_id, exec_id=exec_id)

    @staticmethod
    def exec_started(container_id: str, exec_id: str, pid: int) -> Event:
        return "/tasks/exec-started", events_pb2.TaskExecStarted(
            container_id=container_id, exec_id=exec_id, pid=pid
        )

    @staticmethod
    def paused(container_id: str) -> Event:
        return "/tasks/paused", events_pb2.TaskPaused(container_id=container_id)

    @staticmethod
    def resumed(container_id: str) -> Event:
        return "/tasks/resumed", events_pb2.TaskResumed(container_id=container_id)
