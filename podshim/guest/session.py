"""The agent's session: frames from the virtio-serial port dispatched, requests answered on
threads of their own, events and stdio streams sent, across host sessions (each opens with a
HELLO that carries a snapshot of every process)."""

from __future__ import annotations

import os
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from podshim.guest import protocol as P
from podshim.guest.channel import Channel
from podshim.guest.errors import AgentError, InvalidArgument
from podshim.guest.log import log
from podshim.guest.stdio import InStream, OutStream

if TYPE_CHECKING:
    from podshim.guest.containers import Proc

RECONNECT_POLL = 0.02


class Session:
    """One end of the channel across host sessions: frames in, requests to ``op_<name>``
    methods on threads of their own, responses, events and stdio streams out."""

    def __init__(self, chan: Channel) -> None:
        self.chan = chan
        self._lock = threading.Lock()  # streams, and the subclass's containers
        # Held across "record an exit + send its event" and "snapshot + send HELLO": an exit is
        # then either in the snapshot or its event comes after the HELLO answer.
        self._events = threading.Lock()
        self._out: dict[int, OutStream] = {}
        self._in: dict[int, InStream] = {}

    def admit(self, op: str) -> None:
        """Raise an AgentError if ``op`` may not run now (the subclass's rule; any by default)."""

    def snapshot(self) -> list[dict[str, Any]]:
        """Every process, for a new session's HELLO answer (called under ``_lock``)."""
        raise NotImplementedError

    # -- plumbing ---------------------------------------------------------------------------

    def event(self, obj: dict[str, Any]) -> None:
        with self._events:
            self.chan.send_json(P.EVENT, 0, obj)

    def add_stream(self, direction: str, sid: int, fd: int) -> None:
        with self._lock:
            if direction == "out":
                out = OutStream(self, sid, fd)
                self._out[sid] = out
                out.start()
            else:
                inp = InStream(self, sid, fd)
                self._in[sid] = inp
                inp.start()

    def forget_stream(self, sid: int) -> None:
        with self._lock:
            self._out.pop(sid, None)
            self._in.pop(sid, None)

    def process_exited(self, proc: Proc, status: int) -> None:
        with self._events:
            proc.status = status
            ev = {"event": "exit", "id": proc.container.id, "exec_id": proc.exec_id, "pid": proc.pid}
            self.chan.send_json(P.EVENT, 0, {**ev, "status": status})

    def hello(self, req: dict[str, Any]) -> None:
        with self._lock:
            # The old session's unacknowledged bytes will never be acknowledged.
            for out in self._out.values():
                out.reset_window()
        with self._events:
            with self._lock:
                procs = self.snapshot()
            self.chan.send_json(P.HELLO, 0, {"session": req.get("session"), "processes": procs})
        log(f"session {req.get('session')} open")

    def serve(self) -> None:
        dec = P.Decoder()
        connected = False
        while True:
            try:
                data = os.read(self.chan.fd, 65536)
            except InterruptedError:
                continue
            if not data:
                # virtio-serial reads EOF while no host is connected; a host that comes back
                # starts a new session, so a half-read frame of the old one is dropped.
                if connected:
                    log("host disconnected")
                    connected = False
                dec.reset()
                time.sleep(RECONNECT_POLL)
                continue
            connected = True
            for frame in dec.feed(data):
                self.dispatch(frame)

    def dispatch(self, frame: P.Frame) -> None:
        if frame.type == P.DATA:
            with self._lock:
                inp = self._in.get(frame.stream)
            if inp is not None:
                inp.push(frame.payload, bool(frame.flags & P.FLAG_EOF))
            return
        if frame.type == P.ACK:
            with self._lock:
                out = self._out.get(frame.stream)
            if out is not None:
                out.ack(P.decode_ack(frame.payload))
            return
        if frame.type == P.HELLO:
            self.hello(P.decode_json(frame.payload))
            return
        if frame.type == P.REQUEST:
            threading.Thread(target=self._handle, args=(frame,), daemon=True).start()

    def _handle(self, frame: P.Frame) -> None:
        op = "?"
        try:
            req = P.decode_json(frame.payload)
            op = str(req.get("op"))
            fn = getattr(self, f"op_{op}", None)
            if fn is None:
                raise InvalidArgument(f"unknown op {op!r}")
            self.admit(op)
            result = fn(req)
            resp: dict[str, Any] = {"ok": True, **(result or {})}
        except AgentError as e:
            resp = {"error": e.kind, "message": str(e)}
        except Exception as e:
            log(f"{op} failed:\n{traceback.format_exc()}")
            resp = {"error": "unknown", "message": f"{op}: {e}"}
        self.chan.send_json(P.RESPONSE, frame.stream, resp)
