"""Events to containerd over ttrpc ``Forward`` (spec §4.1).

One FIFO queue drained by one worker, so containerd sees events in publish order.  A failed
Forward is retried after 1 s, 2 s, … five times, reconnecting when the connection closed;
only then is the event dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from podshim.api import events_ttrpc_pb2
from podshim.api.typeurls import pack
from podshim.errdefs import ShimError
from podshim.events import timestamp
from podshim.shim.telemetry import TELEMETRY
from podshim.ttrpc.client import Client

log = logging.getLogger(__name__)

SERVICE = "containerd.services.events.ttrpc.v1.Events"
FORWARD_TIMEOUT = 5.0
RETRIES = 5
RETRY_DELAY = 1.0  # seconds before the first retry; the n-th waits n times this


class EventPublisher:
    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self._queue: asyncio.Queue[events_ttrpc_pb2.ForwardRequest | None] = asyncio.Queue()
        self._client: Client | None = None
        self._worker: asyncio.Task[None] | None = None

    def publish(self, topic: str, event: Message) -> None:
        cid = getattr(event, "container_id", "")
        eid = getattr(event, "exec_id", "")
        if topic == "/tasks/exit":
            eid = "" if event.id == cid else event.id  # type: ignore[attr-defined]
        TELEMETRY.task_event(topic, cid, eid)
        env = events_ttrpc_pb2.Envelope(
            timestamp=timestamp(time.time()), namespace=self.namespace, topic=topic, event=pack(event)
        )
        self._queue.put_nowait(events_ttrpc_pb2.ForwardRequest(envelope=env))
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            req = await self._queue.get()
            if req is None:
                return
            await self._forward(req)

    async def _forward(self, req: events_ttrpc_pb2.ForwardRequest) -> None:
        meta = (("containerd-namespace-ttrpc", self.namespace),)
        for attempt in range(RETRIES + 1):
            try:
                if self._client is None or self._client.closed:
                    self._client = await Client.connect(self.address)
                await self._client.call(
                    SERVICE, "Forward", req, empty_pb2.Empty, timeout=FORWARD_TIMEOUT, metadata=meta
                )
                TELEMETRY.event("published")
                return
            except (OSError, ShimError) as e:
                if attempt == RETRIES:
                    TELEMETRY.event("dropped")
                    log.error("dropping event %s after %d attempts: %s", req.envelope.topic, attempt + 1, e)
                    return
                TELEMETRY.event("retried")
                await asyncio.sleep(RETRY_DELAY * (attempt + 1))

    async def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued (bounded), then disconnect."""
        if self._worker is not None:
            self._queue.put_nowait(None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._worker), timeout)
            self._worker.cancel()
        if self._client is not None:
            await self._client.close()
