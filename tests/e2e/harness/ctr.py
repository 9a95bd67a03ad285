"""Thin wrappers around the `ctr` client: one-shot commands, commands on a pty, and `ctr events`."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

CTR = "ctr"
DEFAULT_TIMEOUT = 60.0


class CtrResult(NamedTuple):
    rc: int
    stdout: str
    stderr: str


class CtrTimeout(AssertionError):
    """A ctr command outlived its timeout (it was killed); usually a hung shim."""


@dataclass(frozen=True)
class Ctr:
    """`ctr --address <address> -n <namespace> …`, bound to one containerd and one namespace."""

    address: str
    namespace: str
    timeout: float = DEFAULT_TIMEOUT
    binary: str = CTR

    def argv(self, *args: str) -> list[str]:
        return [self.binary, "--address", self.address, "-n", self.namespace, *args]

    def with_namespace(self, namespace: str) -> Ctr:
        return Ctr(self.address, namespace, self.timeout, self.binary)

    def run(self, *args: str, input: str | None = None, timeout: float | None = None) -> CtrResult:
        argv = self.argv(*args)
        try:
            p = subprocess.run(
                argv,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout or self.timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise CtrTimeout(f"timed out after {e.timeout}s: {' '.join(argv)}\n{_text(e.stderr)}") from None
        return CtrResult(p.returncode, p.stdout, p.stderr)

    def check(self, *args: str, input: str | None = None, timeout: float | None = None) -> str:
        """Run and require rc 0; return stdout."""
        res = self.run(*args, input=input, timeout=timeout)
        if res.rc != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed with rc={res.rc}: {res.stderr.strip()}")
        return res.stdout

    def run_tty(
        self,
        *args: str,
        rows: int = 24,
        cols: int = 80,
        respond: tuple[bytes, bytes] | None = None,
        timeout: float | None = None,
    ) -> CtrResult:
        """Run ctr with a pty of the given size as stdin/stdout/stderr (what `-t` needs).

        The terminal merges stdout and stderr, so both come back in `stdout`, with CRLF line ends.
        `respond=(marker, data)` types `data` once `marker` has appeared in the output.
        """
        argv = self.argv(*args)
        return run_in_pty(argv, rows=rows, cols=cols, respond=respond, timeout=timeout or self.timeout)

    def events(self, *filters: str) -> EventStream:
        return EventStream(self, filters)

    def task_status(self, container_id: str) -> str | None:
        """STATUS column of `ctr task ls` for the container, None if it has no task."""
        for line in self.check("task", "ls").splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 3 and cols[0] == container_id:
                return cols[2]
        return None

    def wait_task_status(self, container_id: str, status: str, timeout: float = 30.0) -> None:
        # ctr 1.6 has no `task wait` for a detached task, so poll.
        deadline = time.monotonic() + timeout
        seen: str | None = None
        while time.monotonic() < deadline:
            seen = self.task_status(container_id)
            if seen == status:
                return
            time.sleep(0.05)
        raise AssertionError(f"task {container_id} did not reach {status} within {timeout}s (last: {seen})")


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b if isinstance(b, str) else b.decode(errors="replace")


def run_in_pty(
    argv: Sequence[str],
    *,
    rows: int,
    cols: int,
    respond: tuple[bytes, bytes] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> CtrResult:
    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        # ctr finds its console through fds 0-2, so no controlling terminal is needed (that would take
        # a preexec_fn, which is unsafe next to the event reader threads).
        proc = subprocess.Popen(
            list(argv), stdin=slave, stdout=slave, stderr=slave, start_new_session=True, close_fds=True
        )
    finally:
        os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                proc.kill()
                proc.wait()
                text = out.decode(errors="replace")
                raise CtrTimeout(f"timed out after {timeout}s on a pty: {' '.join(argv)}\n{text}")
            ready = select.select([master], [], [], min(remaining, 0.2))[0]
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every slave fd is closed, i.e. ctr is gone
                    chunk = b""
                if not chunk:
                    break
                out += chunk
                # Typed only after the marker: bytes sent before ctr has put the terminal in raw mode
                # would be echoed by our own pty as well, making the output timing-dependent.
                if respond is not None and respond[0] in out:
                    os.write(master, respond[1])
                    respond = None
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
    rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    return CtrResult(rc, out.decode(errors="replace"), "")


@dataclass(frozen=True)
class Event:
    namespace: str
    topic: str
    container_id: str
    exec_id: str
    payload: dict[str, Any]

    @property
    def subject(self) -> str:
        """The exec id for exec events (including an exec's /tasks/exit), else the container id."""
        return self.exec_id or self.container_id


def parse_event_line(line: str) -> Event | None:
    """Parse one line of `ctr events` (1.6: "<go time> <namespace> <topic> <json>")."""
    tokens = line.rstrip("\n").split(" ")
    # The Go time takes 4 tokens ("2024-01-02 15:04:05.123 +0000 UTC"); the topic is the first "/…" after it.
    for i in range(4, len(tokens)):
        if tokens[i].startswith("/"):
            topic = tokens[i]
            namespace = tokens[i - 1]
            rest = " ".join(tokens[i + 1 :]).strip()
            break
    else:
        return None
    try:
        payload = json.loads(rest) if rest else {}
    except json.JSONDecodeError:
        payload = {"_raw": rest}
    if not isinstance(payload, dict):
        payload = {"_raw": payload}
    container_id = str(payload.get("container_id", ""))
    exec_id = str(payload.get("exec_id", ""))
    if not exec_id and topic == "/tasks/exit":
        pid_owner = str(payload.get("id", ""))
        if pid_owner and pid_owner != container_id:
            exec_id = pid_owner
    return Event(namespace, topic, container_id, exec_id, payload)


_sync_counter = itertools.count()


@dataclass
class EventStream:
    """`ctr events` running in the background, collecting parsed events of one namespace.

    It ends when containerd stops (e.g. `PrivateContainerd.restart()`): start a new one after that.
    `errors` keeps ctr's stderr, e.g. "cannot unmarshal an event from Any" for an event published
    with a type_url containerd does not know (such an event is missing from `events`).
    """

    ctr: Ctr
    filters: Sequence[str] = ()
    events: list[Event] = field(default_factory=list)
    unparsed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _proc: subprocess.Popen[str] | None = field(default=None, repr=False)
    _threads: list[threading.Thread] = field(default_factory=list, repr=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def start(self) -> EventStream:
        # A namespace filter keeps other tests' (and other namespaces') events out.
        argv = [
            self.ctr.binary, "--address", self.ctr.address, "-n", self.ctr.namespace, "events",
            f"namespace=={self.ctr.namespace}", *self.filters,
        ]
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            bufsize=1,
        )
        # stderr is drained too: a full pipe would stall ctr, and with it the events.
        self._threads = [
            threading.Thread(target=self._read, args=(self._proc,), daemon=True),
            threading.Thread(target=self._read_errors, args=(self._proc,), daemon=True),
        ]
        for t in self._threads:
            t.start()
        self.sync()
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            ev = parse_event_line(line)
            with self._cond:
                if ev is None:
                    self.unparsed.append(line)
                else:
                    self.events.append(ev)
                self._cond.notify_all()

    def _read_errors(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._cond:
                self.errors.append(line.rstrip("\n"))

    def sync(self, timeout: float = 10.0) -> None:
        """Block until the subscription is live, by generating an event and waiting to see it.

        `ctr events` prints nothing when it has subscribed, so without this the first events of a
        scenario could be published before the subscription exists and be lost.
        """
        token = f"{os.getpid()}-{next(_sync_counter)}"
        deadline = time.monotonic() + timeout
        while True:
            self.ctr.check("namespaces", "label", self.ctr.namespace, f"podshim.test/sync={token}")
            try:
                self.wait_for(
                    lambda e: e.topic == "/namespaces/update" and token in json.dumps(e.payload), timeout=0.5
                )
                return
            except AssertionError:
                proc = self._proc
                exited = proc is not None and proc.poll() is not None
                if exited or time.monotonic() > deadline:
                    raise AssertionError(f"ctr events never delivered a sync event: {self.errors}") from None

    def wait_for(self, pred: Callable[[Event], bool], timeout: float = 10.0) -> Event:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events:
                    if pred(ev):
                        return ev
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    topics = [(e.topic, e.subject) for e in self.events]
                    raise AssertionError(f"no matching event within {timeout}s; saw {topics}")
                self._cond.wait(remaining)

    def wait_quiet(self, quiet: float = 0.3, timeout: float = 5.0) -> None:
        """Wait until no new event arrived for `quiet` seconds (late stragglers would change a sequence)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            count = len(self.events)
            while time.monotonic() < deadline:
                self._cond.wait(quiet)
                if len(self.events) == count:
                    return
                count = len(self.events)

    def snapshot(self) -> list[Event]:
        with self._cond:
            return list(self.events)

    def pairs(self) -> list[tuple[str, str]]:
        """(topic, container id or, for exec events, exec id) of every event so far."""
        return [(e.topic, e.subject) for e in self.snapshot()]

    def task_events(self, container_id: str) -> list[tuple[str, str]]:
        """(topic, subject) of the /tasks/* events of one container, in arrival order."""
        return [(e.topic, e.subject) for e in self.snapshot() if e.topic.startswith("/tasks/")
                and e.container_id == container_id]

    def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for t in self._threads:
            t.join(timeout=5)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
        self._proc = None

    def __enter__(self) -> EventStream:
        # `with ctr.events():` and `with ctr.events().start():` both work.
        return self if self._proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cleanup_namespace(ctr: Ctr) -> list[str]:
    """Force-delete every task and container of ctr's namespace; return what failed.

    Goes through containerd, as a user would, so a shim that leaks despite a proper delete is still
    caught by the leak check that runs afterwards.
    """
    problems: list[str] = []
    res = ctr.run("task", "ls", "--quiet", timeout=30)
    for tid in res.stdout.split():
        r = ctr.run("task", "rm", "--force", tid, timeout=30)
        if r.rc != 0 and "not found" not in r.stderr:
            problems.append(f"task rm -f {tid}: rc={r.rc} {r.stderr.strip()}")
    res = ctr.run("container", "ls", "--quiet", timeout=30)
    ids = res.stdout.split()
    if ids:
        r = ctr.run("container", "rm", *ids, timeout=30)
        if r.rc != 0:
            problems.append(f"container rm {' '.join(ids)}: rc={r.rc} {r.stderr.strip()}")
    return problems
