"""podshim's guest agent: PID 1 of a pod VM, running containers with runc for the shim.

Runs on the guest's ``/usr/bin/python3`` with the standard library only, started by the
initramfs's init as ``python3 -m podshim.guest.agent``.  Python, the modules the agent imports and
runc live in guest RAM (:mod:`podshim.vm.layer`), so that a VM can be saved as a template once the
agent is idle and cloned for each pod.  It speaks :mod:`podshim.guest.protocol` over a
virtio-serial port and:

* is set up for its pod by the host's ``setup`` request, after a cold boot or a restore from a
  template alike (:meth:`Agent.op_setup`): host entropy into the kernel's pool first, then the
  clock, the MAC, addresses and hostname, then the pod share; container requests before it are
  refused;

* creates, starts, execs, kills, pauses, resumes, updates and deletes containers with
  ``crun --root /run/runc`` (``runc`` when the layer has no crun: both take the same commands),
  from bundles the shim put in the pod share;
* carries each process's stdio as DATA streams (pipes, or the pty runc hands back);
* reports exits and OOM kills as events, and answers stats from the guest's cgroup v2;
* keeps serving when the shim disconnects and reconnects: the port is a byte pipe that outlives
  host connections, so each new session starts with a HELLO carrying a snapshot of every process.

Threads, not asyncio: ``import asyncio`` pulls in ssl and friends, which under TCG over 9p costs
a noticeable part of boot, and everything here is a handful of blocking loops.  Being PID 1, the
agent reaps every orphan; one reaper thread owns ``wait4(-1)`` and nothing else waits for a
child, so no exit status is lost to a racing ``waitpid``.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import fcntl
import itertools
import json
import os
import select
import signal
import socket
import struct
import sys
import termios
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from podshim.guest import protocol as P

RUNC = "/usr/bin/crun" if os.path.exists("/usr/bin/crun") else "/usr/sbin/runc"
RUNC_ROOT = "/run/runc"
PORT_NAME = "podshim.agent"
STATE = "/run/podshim/agent-state"
CGROUP_ROOT = "/sys/fs/cgroup"
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
RECONNECT_POLL = 0.02
UNCLAIMED_KEEP = 1024
BUSYBOX = "/bb/busybox"
SHARE_TAG = "podshim-shared"
SHARE_DIR = "/run/podshim/shared"
SHARE_OPTIONS = "trans=virtio,version=9p2000.L,msize=262144,cache=mmap"
# <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07)
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
MIN_ENTROPY_BYTES = 32
# Before setup only these: a VM restored from a template shares its random state with every
# other clone until the host's entropy is in.
BEFORE_SETUP = frozenset(("ping", "setup", "state", "vm_stats"))


def log(msg: str) -> None:
    try:
        with open("/proc/uptime") as f:
            up = f.read().split()[0]
    except OSError:
        up = "?"
    print(f"podshim-agent [{up}] {msg}", file=sys.stderr, flush=True)


class AgentError(Exception):
    kind = "unknown"


class NotFound(AgentError):
    kind = "not_found"


class InvalidArgument(AgentError):
    kind = "invalid_argument"


class FailedPrecondition(AgentError):
    kind = "failed_precondition"


class AlreadyExists(AgentError):
    kind = "already_exists"


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None and fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


# -- children ---------------------------------------------------------------------------------


def exit_code(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)


class Reaper:
    """The only waiter: reaps every child and orphan, hands each status to whoever claimed it."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._claims: dict[int, Callable[[int], None]] = {}
        # Exits that came before their claim (a container that dies while runc create runs).
        self._unclaimed: collections.OrderedDict[int, int] = collections.OrderedDict()

    def start(self) -> None:
        threading.Thread(target=self._run, name="reaper", daemon=True).start()

    def spawn(self, argv: list[str], fds: dict[int, int]) -> int:
        """posix_spawn with exactly ``fds`` (child fd -> ours) and /dev/null for missing 0-2."""
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            actions = [(os.POSIX_SPAWN_DUP2, fds.get(i, devnull), i) for i in (0, 1, 2)]
            actions += [(os.POSIX_SPAWN_DUP2, ours, theirs) for theirs, ours in fds.items() if theirs > 2]
            pid = os.posix_spawn(argv[0], argv, ENV, file_actions=actions)
        finally:
            os.close(devnull)
        with self._lock:
            self._lock.notify_all()
        return pid

    def claim(self, pid: int, callback: Callable[[int], None]) -> None:
        with self._lock:
            status = self._unclaimed.pop(pid, None)
            if status is None:
                self._claims[pid] = callback
                return
        callback(status)

    def wait(self, pid: int) -> int:
        done = threading.Event()
        result: list[int] = []

        def got(status: int) -> None:
            result.append(status)
            done.set()

        self.claim(pid, got)
        done.wait()
        return result[0]

    def _run(self) -> None:
        while True:
            try:
                pid, status, _ = os.wait4(-1, 0)
            except ChildProcessError:
                with self._lock:
                    self._lock.wait(0.5)
                continue
            except InterruptedError:
                continue
            code = exit_code(status)
            with self._lock:
                cb = self._claims.pop(pid, None)
                if cb is None:
                    self._unclaimed[pid] = code
                    while len(self._unclaimed) > UNCLAIMED_KEEP:
                        self._unclaimed.popitem(last=False)
            if cb is not None:
                try:
                    cb(code)
                except Exception:
                    log(f"exit callback for {pid} failed:\n{traceback.format_exc()}")


REAPER = Reaper()


class RuncError(AgentError):
    pass


def run(argv: list[str], fds: dict[int, int] | None = None, capture: bool = False) -> tuple[int, bytes]:
    """Run a helper to completion; with ``capture``, collect its stdout."""
    fds = dict(fds or {})
    r = w = -1
    if capture:
        r, w = os.pipe()
        fds[1] = w
    try:
        pid = REAPER.spawn(argv, fds)
    finally:
        _close(w)
    out = b""
    if capture:
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        _close(r)
        out = b"".join(chunks)
    return REAPER.wait(pid), out


def runc(cid: str, *args: str, fds: dict[int, int] | None = None, capture: bool = False) -> bytes:
    logfile = os.path.join(STATE, f"{cid}.runc.log")
    argv = [RUNC, "--root", RUNC_ROOT, "--log", logfile, "--log-format", "json", *args]
    status, out = run(argv, fds, capture)
    if status != 0:
        raise RuncError(f"runc {args[0]} failed: {_last_runc_error(logfile) or f'exit status {status}'}")
    return out


def _last_runc_error(path: str) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        with contextlib.suppress(ValueError, AttributeError):
            entry = json.loads(line)
            if entry.get("level") == "error":
                return str(entry.get("msg", ""))
    return ""


# -- the channel ------------------------------------------------------------------------------


def find_port(name: str = PORT_NAME) -> str:
    base = "/sys/class/virtio-ports"
    for port in sorted(os.listdir(base) if os.path.isdir(base) else []):
        with contextlib.suppress(OSError), open(os.path.join(base, port, "name")) as f:
            if f.read().strip() == name:
                return os.path.join("/dev", port)
    raise SystemExit(f"no virtio-serial port named {name}")


class Channel:
    """Whole-frame writes under one lock, so frames from many threads never interleave."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._wlock = threading.Lock()

    def send(self, frame: bytes) -> None:
        view = memoryview(frame)
        with self._wlock:
            while view:
                try:
                    n = os.write(self.fd, view)
                except InterruptedError:
                    continue
                view = view[n:]

    def send_json(self, ftype: int, stream: int, obj: dict[str, Any]) -> None:
        self.send(P.encode_json(ftype, stream, obj))


# -- stdio streams ----------------------------------------------------------------------------


class OutStream:
    """A process's output: read its pipe (or pty) and send DATA frames within the window."""

    def __init__(self, agent: Agent, sid: int, fd: int) -> None:
        self.agent, self.sid, self.fd = agent, sid, fd
        self._cond = threading.Condition()
        self._unacked = 0
        self.done = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"out-{self.sid}", daemon=True).start()

    def ack(self, n: int) -> None:
        with self._cond:
            self._unacked = max(0, self._unacked - n)
            self._cond.notify_all()

    def reset_window(self) -> None:
        self.ack(P.WINDOW)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._unacked >= P.WINDOW:
                        self._cond.wait()
                    room = P.WINDOW - self._unacked  # the host cuts off a stream that overruns it
                try:
                    data = os.read(self.fd, min(P.DATA_CHUNK, room))
                except OSError:
                    data = b""  # EIO: the pty's last slave closed
                if not data:
                    break
                with self._cond:
                    self._unacked += len(data)
                self.agent.chan.send(P.encode(P.DATA, self.sid, data))
            self.agent.chan.send(P.encode(P.DATA, self.sid, b"", P.FLAG_EOF))
        finally:
            _close(self.fd)
            self.done.set()
            self.agent.forget_stream(self.sid)


class InStream:
    """A process's stdin: DATA frames from the host, written by a thread of its own so that a
    container that does not read its stdin blocks only this stream."""

    def __init__(self, agent: Agent, sid: int, fd: int) -> None:
        self.agent, self.sid, self.fd = agent, sid, fd
        self._queue: collections.deque[tuple[bytes, bool]] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"in-{self.sid}", daemon=True).start()

    def push(self, data: bytes, eof: bool) -> None:
        with self._cond:
            self._queue.append((data, eof))
            self._cond.notify_all()

    def close(self) -> None:
        self.push(b"", True)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue:
                        self._cond.wait()
                    data, eof = self._queue.popleft()
                view = memoryview(data)
                while view:
                    try:
                        n = os.write(self.fd, view)
                    except InterruptedError:
                        continue
                    except OSError:
                        return  # the reader is gone for good
                    view = view[n:]
                if data:
                    self.agent.chan.send(P.encode_ack(self.sid, len(data)))
                if eof:
                    return
        finally:
            _close(self.fd)
            self.agent.forget_stream(self.sid)


_console_ids = itertools.count(1)


class Stdio:
    """The agent's side of one process's stdio, and the child's ends for runc."""

    def __init__(self, agent: Agent, spec: dict[str, Any], name: str) -> None:
        self.agent = agent
        self.stdin_sid = int(spec.get("stdin") or 0)
        self.stdout_sid = int(spec.get("stdout") or 0)
        self.stderr_sid = int(spec.get("stderr") or 0)
        self.terminal = bool(spec.get("terminal"))
        self.child: dict[int, int] = {}
        self._parent: list[tuple[str, int, int]] = []  # (direction, sid, fd)
        self.console_path = ""
        self._console: socket.socket | None = None
        self.master = -1
        if self.terminal:
            # Numbered, not named: container ids alone can exceed sun_path's 108 bytes.
            self.console_path = os.path.join(STATE, f"console-{next(_console_ids)}.sock")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.console_path)
            self._console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._console.bind(self.console_path)
            self._console.listen(1)
            self._console.settimeout(30)
            return
        if self.stdin_sid:
            r, w = os.pipe()
            self.child[0] = r
            self._parent.append(("in", self.stdin_sid, w))
        if self.stdout_sid:
            r, w = os.pipe()
            self.child[1] = w
            self._parent.append(("out", self.stdout_sid, r))
        if self.stderr_sid:
            if self.stderr_sid == self.stdout_sid:
                self.child[2] = self.child[1]
            else:
                r, w = os.pipe()
                self.child[2] = w
                self._parent.append(("out", self.stderr_sid, r))

    def runc_args(self) -> list[str]:
        return ["--console-socket", self.console_path] if self.terminal else []

    def receive_console(self) -> None:
        """After runc create/exec returned: take the pty master runc sent to the console socket."""
        assert self._console is not None
        try:
            conn, _ = self._console.accept()
            with conn:
                _msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
        finally:
            self._console.close()
            self._console = None
            with contextlib.suppress(OSError):
                os.unlink(self.console_path)
        if not fds:
            raise AgentError("runc sent no console master")
        self.master = fds[0]
        if self.stdin_sid:
            self._parent.append(("in", self.stdin_sid, os.dup(self.master)))
        if self.stdout_sid:
            self._parent.append(("out", self.stdout_sid, os.dup(self.master)))

    def started(self) -> None:
        """The process holds its ends: close ours and start copying."""
        _close(*set(self.child.values()))
        self.child.clear()
        for direction, sid, fd in self._parent:
            self.agent.add_stream(direction, sid, fd)
        self._parent.clear()

    def resize(self, width: int, height: int) -> None:
        if self.master >= 0:
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def close(self) -> None:
        _close(*set(self.child.values()), *(fd for _, _, fd in self._parent), self.master)
        self.child.clear()
        self._parent.clear()
        self.master = -1
        if self._console is not None:
            self._console.close()
            self._console = None


# -- containers -------------------------------------------------------------------------------


class Proc:
    def __init__(self, container: Container, exec_id: str, stdio: Stdio) -> None:
        self.container = container
        self.exec_id = exec_id
        self.stdio = stdio
        self.pid = 0
        self.status: int | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.container.id,
            "exec_id": self.exec_id,
            "pid": self.pid,
            "exited": self.status is not None,
            "status": self.status or 0,
        }

    def claim(self, pid: int) -> None:
        self.pid = pid
        REAPER.claim(pid, self._exited)

    def _exited(self, status: int) -> None:
        self.container.agent.process_exited(self, status)


class Container:
    def __init__(self, agent: Agent, cid: str, bundle: str) -> None:
        self.agent = agent
        self.id = cid
        self.bundle = bundle
        self.init: Proc | None = None
        self.execs: dict[str, Proc] = {}
        self.cgroup = ""
        self._oom_stop: int = -1

    def find_cgroup(self) -> None:
        assert self.init is not None
        with contextlib.suppress(OSError), open(f"/proc/{self.init.pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    self.cgroup = CGROUP_ROOT + line[3:].strip()

    def watch_oom(self) -> None:
        """memory.events changes wake poll() with POLLPRI; each rise of oom_kill is an event."""
        if not self.cgroup or self._oom_stop >= 0:
            return
        path = os.path.join(self.cgroup, "memory.events")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        stop_r, self._oom_stop = os.pipe()

        def count() -> int:
            return _kv_fd(fd).get("oom_kill", 0)

        # Counted before the thread starts, at create: an OOM kill right after start is news.
        seen = count()

        def loop() -> None:
            nonlocal seen
            poller = select.poll()
            poller.register(fd, select.POLLPRI | select.POLLERR)
            poller.register(stop_r, select.POLLIN)
            try:
                while True:
                    ready = dict(poller.poll())
                    if stop_r in ready:
                        return
                    now = count()
                    if now > seen:
                        self.agent.event({"event": "oom", "id": self.id})
                    seen = now
            except OSError:
                return
            finally:
                _close(fd, stop_r)

        threading.Thread(target=loop, name=f"oom-{self.id}", daemon=True).start()

    def stop_oom(self) -> None:
        _close(self._oom_stop)
        self._oom_stop = -1

    def processes(self) -> list[Proc]:
        return ([self.init] if self.init else []) + list(self.execs.values())


def _kv_fd(fd: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in os.pread(fd, 4096, 0).decode().splitlines():
            k, _, v = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[k] = int(v)
    return out


def _kv(path: str) -> dict[str, int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        return _kv_fd(fd)
    finally:
        os.close(fd)


def _int(path: str) -> int:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return 0
    if text == "max":
        return 2**64 - 1  # containerd's "unlimited"
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return 0


MEMORY_STAT_KEYS = (
    "anon", "file", "kernel_stack", "slab", "sock", "shmem", "file_mapped", "file_dirty",
    "file_writeback", "anon_thp", "inactive_anon", "active_anon", "inactive_file", "active_file",
    "unevictable", "slab_reclaimable", "slab_unreclaimable", "pgfault", "pgmajfault",
    "workingset_refault", "workingset_activate", "workingset_nodereclaim", "pgrefill", "pgscan",
    "pgsteal", "pgactivate", "pgdeactivate", "pglazyfree", "pglazyfreed", "thp_fault_alloc",
    "thp_collapse_alloc",
)  # fmt: skip


def cgroup_v2_metrics(d: str) -> dict[str, Any]:
    """The fields of containerd's cgroups v2 Metrics, as the host's runc backend reports them."""
    cpu = _kv(f"{d}/cpu.stat")
    mem = _kv(f"{d}/memory.stat")
    events = _kv(f"{d}/memory.events")
    memory: dict[str, Any] = {k: mem.get(k, 0) for k in MEMORY_STAT_KEYS}
    memory.update(
        usage=_int(f"{d}/memory.current"),
        usage_limit=_int(f"{d}/memory.max"),
        swap_usage=_int(f"{d}/memory.swap.current"),
        swap_limit=_int(f"{d}/memory.swap.max"),
    )
    return {
        "pids": {"current": _int(f"{d}/pids.current"), "limit": _int(f"{d}/pids.max")},
        "cpu": {
            k: cpu.get(k, 0)
            for k in (
                "usage_usec",
                "user_usec",
                "system_usec",
                "nr_periods",
                "nr_throttled",
                "throttled_usec",
            )  # fmt: skip
        },
        "memory": memory,
        "memory_events": {k: events.get(k, 0) for k in ("low", "high", "max", "oom", "oom_kill")},
    }


def vm_stats() -> dict[str, Any]:
    info = {}
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            with contextlib.suppress(ValueError, IndexError):
                info[k] = int(v.split()[0]) * 1024
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    cpu = _kv(f"{CGROUP_ROOT}/cpu.stat")
    return {
        "mem_total": info.get("MemTotal", 0),
        "mem_available": info.get("MemAvailable", 0),
        "uptime": uptime,
        "cpu_usage_usec": cpu.get("usage_usec", 0),
    }


# -- the agent --------------------------------------------------------------------------------


class Agent:
    def __init__(self, chan: Channel) -> None:
        self.chan = chan
        self.containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        self._lock = threading.Lock()  # containers, streams
        # Held across "record an exit + send its event" and "snapshot + send HELLO": an exit is
        # then either in the snapshot or its event comes after the HELLO answer.
        self._events = threading.Lock()
        self._out: dict[int, OutStream] = {}
        self._in: dict[int, InStream] = {}
        self.faults = "podshim.faults=1" in _read("/proc/cmdline")
        self.set_up = False
        self._setup_lock = threading.Lock()

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
                procs = [p.snapshot() for c in self.containers.values() for p in c.processes() if p.pid]
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
            if not self.set_up and op not in BEFORE_SETUP:
                raise FailedPrecondition(f"{op} before the VM was set up for its pod")
            result = fn(req)
            resp: dict[str, Any] = {"ok": True, **(result or {})}
        except AgentError as e:
            resp = {"error": e.kind, "message": str(e)}
        except Exception as e:
            log(f"{op} failed:\n{traceback.format_exc()}")
            resp = {"error": "unknown", "message": f"{op}: {e}"}
        self.chan.send_json(P.RESPONSE, frame.stream, resp)

    def _container(self, cid: str) -> Container:
        with self._lock:
            c = self.containers.get(cid)
        if c is None:
            raise NotFound(f"container {cid} not found in the VM")
        return c

    def _proc(self, req: dict[str, Any]) -> Proc:
        c = self._container(str(req["id"]))
        eid = str(req.get("exec_id") or "")
        p = c.execs.get(eid) if eid else c.init
        if p is None:
            raise NotFound(f"process {eid or c.id} not found in the VM")
        return p

    # -- operations ---------------------------------------------------------------------------

    def op_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid()}

    def op_create(self, req: dict[str, Any]) -> dict[str, Any]:
        cid, bundle = str(req["id"]), str(req["bundle"])
        with self._lock:
            if cid in self.containers or cid in self._creating:
                raise AlreadyExists(f"container {cid} already exists in the VM")
            self._creating.add(cid)
        c = Container(self, cid, bundle)
        stdio = Stdio(self, req.get("stdio") or {}, cid)
        pid_file = os.path.join(STATE, f"{cid}.pid")
        try:
            args = ["create", "--bundle", bundle, "--pid-file", pid_file, *stdio.runc_args(), cid]
            runc(cid, *args, fds=stdio.child)
            if stdio.terminal:
                stdio.receive_console()
            c.init = Proc(c, "", stdio)
            c.init.claim(_read_pid(pid_file))
            stdio.started()
        except BaseException:
            stdio.close()
            with contextlib.suppress(AgentError):
                runc(cid, "delete", "--force", cid)
            with self._lock:
                self._creating.discard(cid)
            raise
        c.find_cgroup()
        c.watch_oom()
        with self._lock:
            self._creating.discard(cid)
            self.containers[cid] = c
        return {"pid": c.init.pid}

    def op_start(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(str(req["id"]))
        runc(c.id, "start", c.id)
        assert c.init is not None
        return {"pid": c.init.pid}

    def op_exec(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(str(req["id"]))
        eid = str(req["exec_id"])
        if eid in c.execs:
            raise AlreadyExists(f"exec {eid} already exists in {c.id}")
        name = f"{c.id}.{eid}"
        spec_path = os.path.join(STATE, f"{name}.process.json")
        pid_file = os.path.join(STATE, f"{name}.pid")
        with open(spec_path, "w") as f:
            json.dump(req["process"], f)
        stdio = Stdio(self, req.get("stdio") or {}, name)
        proc = Proc(c, eid, stdio)
        c.execs[eid] = proc
        try:
            args = ["exec", "--process", spec_path, "--detach", "--pid-file", pid_file, *stdio.runc_args()]
            args.append(c.id)
            runc(c.id, *args, fds=stdio.child)
            if stdio.terminal:
                stdio.receive_console()
            proc.claim(_read_pid(pid_file))
            stdio.started()
        except BaseException:
            stdio.close()
            c.execs.pop(eid, None)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(spec_path)
            with contextlib.suppress(OSError):
                os.unlink(pid_file)
        return {"pid": proc.pid}

    def op_kill(self, req: dict[str, Any]) -> dict[str, Any]:
        # Signal 0 probes a process and must stay 0: never "no signal given, so SIGKILL".
        sig = int(req["signal"]) if req.get("signal") is not None else int(signal.SIGKILL)
        if req.get("all"):
            c = self._container(str(req["id"]))
            try:
                runc(c.id, "kill", "--all", c.id, str(sig))
            except RuncError as e:
                if "not running" not in str(e) and "does not exist" not in str(e):
                    raise
            return {}
        p = self._proc(req)
        if p.status is not None or not p.pid:
            raise FailedPrecondition("process already finished")
        if p.exec_id:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                raise FailedPrecondition("process already finished") from None
            return {}
        try:
            runc(p.container.id, "kill", p.container.id, str(sig))
        except RuncError as e:
            if p.status is not None or "not running" in str(e) or "does not exist" in str(e):
                raise FailedPrecondition("process already finished") from e
            raise
        return {}

    def op_delete(self, req: dict[str, Any]) -> dict[str, Any]:
        """Delete a container, or forget one exec of it."""
        cid = str(req["id"])
        eid = str(req.get("exec_id") or "")
        try:
            c = self._container(cid)
        except NotFound:
            return {}
        if eid:
            p = c.execs.pop(eid, None)
            if p is not None:
                self._release(p)
            return {}
        c.stop_oom()
        try:
            runc(cid, "delete", "--force", cid)
        except RuncError as e:
            if "does not exist" not in str(e):
                raise
        for p in c.processes():
            self._release(p)
        with self._lock:
            self.containers.pop(cid, None)
        for name in (f"{cid}.pid", f"{cid}.runc.log"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(STATE, name))
        return {}

    def _release(self, p: Proc) -> None:
        """Close what a deleted process still holds; its stdin writer thread ends too."""
        p.stdio.close()
        with self._lock:
            inp = self._in.get(p.stdio.stdin_sid) if p.stdio.stdin_sid else None
        if inp is not None:
            inp.close()

    def op_pause(self, req: dict[str, Any]) -> dict[str, Any]:
        runc(str(req["id"]), "pause", self._container(str(req["id"])).id)
        return {}

    def op_resume(self, req: dict[str, Any]) -> dict[str, Any]:
        runc(str(req["id"]), "resume", self._container(str(req["id"])).id)
        return {}

    def op_update(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(str(req["id"]))
        path = os.path.join(STATE, f"{c.id}.resources.json")
        with open(path, "w") as f:
            json.dump(req.get("resources") or {}, f)
        try:
            runc(c.id, "update", "--resources", path, c.id)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        return {}

    def op_pids(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(str(req["id"]))
        out = runc(c.id, "ps", "--format", "json", c.id, capture=True)
        return {"pids": [int(p) for p in json.loads(out or b"[]") or []]}

    def op_stats(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(str(req["id"]))
        if not c.cgroup or not os.path.isdir(c.cgroup):
            raise NotFound(f"cgroup of {c.id} does not exist")
        return {"metrics": cgroup_v2_metrics(c.cgroup), "vm": vm_stats()}

    def op_vm_stats(self, req: dict[str, Any]) -> dict[str, Any]:
        return vm_stats()

    def op_resize(self, req: dict[str, Any]) -> dict[str, Any]:
        self._proc(req).stdio.resize(int(req.get("width") or 0), int(req.get("height") or 0))
        return {}

    def op_close_stdin(self, req: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            inp = self._in.get(int(req["stream"]))
        if inp is not None:
            inp.close()
        return {}

    def op_state(self, req: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            procs = [p.snapshot() for c in self.containers.values() for p in c.processes() if p.pid]
        return {"processes": procs}

    def op_setup(self, req: dict[str, Any]) -> dict[str, Any]:
        """Make this VM the pod's, after a cold boot or a restore from a template.

        In that order: host entropy into the kernel's pool and a reseed of its generator, before
        anything can draw from it (every clone of a template resumes with the same pool); the
        clock (a clone's is the template's); the MAC (a clone keeps the template's whatever qemu
        was told); hostname, addresses and routes; then the pod share, which could not be mounted
        while the template was saved."""
        with self._setup_lock:
            if self.set_up:
                raise FailedPrecondition("the VM is already set up")
            t0 = time.monotonic()
            mix_entropy(base64.b64decode(str(req.get("entropy") or "")))
            if req.get("time_ns"):
                time.clock_settime_ns(time.CLOCK_REALTIME, int(req["time_ns"]))
            if "random" in sys.modules:
                sys.modules["random"].seed()
            if req.get("hostname"):
                socket.sethostname(str(req["hostname"]))
            # One shell for every command: under TCG each new process is costly, and a clone's
            # translation cache starts cold.
            cmds = []
            if mac := req.get("mac"):
                cmds += [["ip", "link", "set", "eth0", "down"], ["ip", "link", "set", "eth0", "address", mac]]
            cmds += [["ip", *argv] for argv in req.get("network") or []]
            if req.get("share", True):
                cmds.append(["mount", "-t", "9p", "-o", SHARE_OPTIONS, SHARE_TAG, SHARE_DIR])
            t1 = time.monotonic()
            _busybox_script(cmds)
            self.set_up = True
            log(f"set up for the pod in {time.monotonic() - t0:.3f} s ({t1 - t0:.3f} s before the commands)")
            return {"uptime": float(_read("/proc/uptime").split()[0] or 0)}

    def op_shutdown(self, req: dict[str, Any]) -> dict[str, Any]:
        threading.Thread(target=_poweroff, daemon=True).start()
        return {}

    def op_crash(self, req: dict[str, Any]) -> dict[str, Any]:
        """Fault injection for the tests (only with podshim.faults=1 on the kernel command line):
        the agent dies as a crash would, so the kernel panics and the VM goes away."""
        if not self.faults:
            raise FailedPrecondition("fault injection is off in this VM")
        log("crashing on request")
        os._exit(70)


def mix_entropy(data: bytes) -> None:
    """Credit the host's random bytes to the kernel's pool, then reseed its generator at once, so
    that what a clone draws next never depends on when the kernel would reseed by itself."""
    if len(data) < MIN_ENTROPY_BYTES:
        raise InvalidArgument(f"setup needs at least {MIN_ENTROPY_BYTES} bytes of host entropy")
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def _quote(arg: object) -> str:
    return "'" + str(arg).replace("'", "'\\''") + "'"


def _busybox_script(cmds: list[list[Any]]) -> None:
    """Busybox applets in one ``sh -e``; the error names the command that failed."""
    if not cmds:
        return
    lines = []
    for c in cmds:
        what = _quote(" ".join(map(str, c)))
        lines.append(f"{BUSYBOX} {' '.join(_quote(a) for a in c)} || {{ echo {what}; exit 1; }}")
    status, out = run([BUSYBOX, "sh", "-c", "\n".join(lines)], capture=True)
    if status != 0:
        raise AgentError(f"{out.decode(errors='replace').strip() or 'setup'} failed in the VM")


def _poweroff() -> None:
    time.sleep(0.05)  # let the response reach the host
    os.sync()
    os.execv("/bb/poweroff", ["poweroff", "-f"])


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def main() -> None:
    os.makedirs(STATE, exist_ok=True)
    os.makedirs(RUNC_ROOT, exist_ok=True)
    REAPER.start()
    port = find_port()
    fd = os.open(port, os.O_RDWR | os.O_CLOEXEC)
    log(f"serving on {port}")
    Agent(Channel(fd)).serve()


if __name__ == "__main__":
    main()
