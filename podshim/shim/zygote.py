"""The warm zygote: one long-lived podshim process per containerd that runs the ``start`` and
``delete`` actions in forked children, so that no action pays for an interpreter start.

containerd execs ``containerd-shim-podshim-v1`` (``podshim/shim/entry.c``), which connects to
``<containerd state>/s/zygote-<key>`` (``SOCK_SEQPACKET``). The zygote answers ``A`` (alive) at
once and forks a worker for the connection. Only then does the entry point send, in one message,
its argv, environment and umask, with stdin, stdout, stderr and its cwd as ``SCM_RIGHTS`` fds
(fds in flight to a zygote that never reads them would hold containerd's pipe open):

    header "=4I": MAGIC, umask, argc, envc; then argc + envc NUL-terminated strings

The worker checks the peer (same uid, same namespaces), takes on the caller's stdio, cwd, umask,
environment, rlimits, cgroups and command line, and answers ``R`` (ready) or ``N`` (refused).
The entry point answers ``G`` (go); only then does the worker run the action, through the same
:func:`main.run` as the cold path, and send the exit code as one byte. A refusal, no ``A``
within a few milliseconds, or anything else off, and the entry point runs the action cold: it
execs the Python entry point,
``podshim-cold/containerd-shim-podshim-v1`` in its own dir (setup.sh links it there).
Because nothing runs before ``G``, an action never runs twice.

``key`` is the entry point binary's inode and mtime: installing a new version makes a new key,
so a new zygote, which unlinks its predecessors' sockets; they notice and exit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import sys
import time

from podshim.shim import address

MAGIC = 0x315A5350  # "PSZ1", little-endian
HEADER = struct.Struct("=4I")
MAX_REQUEST = 64 * 1024  # entry.c's MAX_REQUEST
FD_COUNT = 4  # stdin, stdout, stderr, cwd
COLD_DIR = "podshim-cold"  # <dir>/podshim-cold/<name>: the Python entry point, fallback of <dir>/<name>
DEFAULT_IDLE = 600.0  # seconds without a request before the zygote exits
IDLE_ENV = "PODSHIM_ZYGOTE_IDLE"
TICK = 2.0  # how often the zygote checks that its socket is still its own
NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")

_PR_SET_MM, _PR_SET_MM_MAP = 35, 14


def key_of(entry: str) -> str:
    st = os.stat(entry)
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}"


def socket_path(bundle: str, key: str) -> str | None:
    """``<state>/s/zygote-<key>``, as entry.c derives it from its cwd (the bundle); None when too long."""
    path = os.path.join(address.state_dir(bundle), "s", f"zygote-{key}")
    return path if len(path) <= address.MAX_SOCKET_PATH else None


def _stat(pid: int | str) -> list[str]:
    """/proc/<pid>/stat, indexed by proc(5)'s field numbers (comm, field 2, may hold anything)."""
    with open(f"/proc/{pid}/stat") as f:
        return ["", "", "", *f.read().rsplit(")", 1)[1].split()]


def _starttime(pid: int) -> str:
    return _stat(pid)[22]


def _answers(path: str) -> bool:
    return address.is_live(path, kind=socket.SOCK_SEQPACKET)


def spawn_if_missing(script: str) -> None:
    """After a cold ``start`` that the C entry point fell back to (``script`` is
    ``<dir>/podshim-cold/<name>``): start this containerd's zygote, detached, unless one answers."""
    cold_dir, name = os.path.split(script)
    if os.path.basename(cold_dir) != COLD_DIR:
        return  # the Python entry point alone: there is no C client to serve
    try:
        path = socket_path(os.getcwd(), key_of(os.path.join(os.path.dirname(cold_dir), name)))
        if path is None or _answers(path):
            return
        parent = os.getppid()
        argv = [sys.executable, "-P", "-m", __name__, path, f"{parent}:{_starttime(parent)}", script,
                os.environ.get(IDLE_ENV) or str(DEFAULT_IDLE)]  # fmt: skip
        devnull: list[tuple[int, int, str, int, int] | tuple[int, int, int]] = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDWR, 0),
            (os.POSIX_SPAWN_DUP2, 0, 1),
            (os.POSIX_SPAWN_DUP2, 0, 2),
        ]
        os.posix_spawn(sys.executable, argv, os.environ, file_actions=devnull, setsid=True)
    except OSError:
        pass  # no zygote costs speed only


# -- the zygote ------------------------------------------------------------------------------


def _preload() -> None:
    """Everything the actions and the server import, loaded once for every child to share."""
    import ctypes  # noqa: F401
    import json  # noqa: F401
    import resource  # noqa: F401
    import subprocess  # noqa: F401
    import traceback  # noqa: F401

    from google.protobuf.timestamp_pb2 import Timestamp  # noqa: F401

    from podshim.api import task_pb2  # noqa: F401
    from podshim.shim import main
    from podshim.system import cgroups, mounts  # noqa: F401

    main.load_server_modules()


def _bind(path: str) -> socket.socket | None:
    """Listen on path; None when a live zygote holds it already."""
    try:
        return address.listen_unlocked(path, kind=socket.SOCK_SEQPACKET, backlog=64)
    except OSError:
        return None


def _retire_others(path: str) -> None:
    """Unlink older versions' sockets: their zygotes see it at their next tick and exit."""
    d, own = os.path.split(path)
    for name in os.listdir(d):
        if name.startswith("zygote-") and name != own:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(d, name))


def _ino(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return -1


def serve(argv: list[str]) -> None:
    import gc
    import select
    import signal

    # No collection in here: a collection frees objects between long-lived ones, and the holes
    # it leaves are filled by each child's first allocations, copying those pages (gc docs).
    gc.disable()
    path, parent, script, idle = argv[0], argv[1], argv[2], float(argv[3])
    os.chdir("/")
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    pid, _, start = parent.partition(":")
    # containerd's lifetime is ours: a pidfd on it, opened before checking it is still the same process.
    pidfd = os.pidfd_open(int(pid))
    if _starttime(int(pid)) != start:
        return
    sock = _bind(path)  # first, so that the actions arriving while we load do not spawn more of us
    if sock is None:
        return
    ino, me = _ino(path), os.getpid()

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(0)  # through the finally below, which removes the socket

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the workers
    try:
        _retire_others(path)
        _preload()
        gc.freeze()  # the children's collections would otherwise write to every shared object's page
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        last = checked = time.monotonic()
        while True:
            events = poller.poll(TICK * 1000)
            now = time.monotonic()
            if any(fd == pidfd for fd, _ in events):
                return  # containerd exited
            if events:
                last = now
                with contextlib.suppress(OSError):
                    _fork_worker(sock, pidfd, script)
            if now - checked >= TICK:
                checked = now
                if _ino(path) != ino:
                    return  # retired by a newer version (or our socket was removed)
            if now - last > idle:
                return
    finally:
        if os.getpid() == me and _ino(path) == ino:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _fork_worker(sock: socket.socket, pidfd: int, script: str) -> None:
    conn, _ = sock.accept()
    with conn:
        conn.send(b"A")  # at once: the entry point waits only milliseconds for it
        if os.fork() == 0:
            sock.close()
            os.close(pidfd)
            _worker(conn, script)


# -- a worker: one request -----------------------------------------------------------------------


class _Request:
    __slots__ = ("argv", "env", "fds", "peer", "umask")

    def __init__(self, peer: int, umask: int, argv: list[str], env: list[str], fds: list[int]) -> None:
        self.peer, self.umask, self.argv, self.env, self.fds = peer, umask, argv, env, fds


def _receive(conn: socket.socket) -> _Request | None:
    """The request, if it comes from our uid and our namespaces and is well formed."""
    pid, uid, _gid = struct.unpack("iII", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    conn.settimeout(1.0)
    data, ancdata, flags, _ = conn.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(FD_COUNT * 4))
    fds: list[int] = []
    for level, kind, fd_data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += struct.unpack(f"{len(fd_data) // 4}i", fd_data[: len(fd_data) // 4 * 4])
    if pid <= 0 or uid != os.geteuid() or len(fds) != FD_COUNT or not _same_namespaces(pid):
        return None
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) < HEADER.size:
        return None
    magic, umask, argc, envc = HEADER.unpack_from(data)
    strings = data[HEADER.size :].split(b"\0")
    if magic != MAGIC or argc < 1 or len(strings) != argc + envc + 1 or strings[-1]:
        return None
    text = [s.decode(errors="surrogateescape") for s in strings[:-1]]
    return _Request(pid, umask, text[:argc], text[argc:], fds)


def _same_namespaces(pid: int) -> bool:
    for ns in NAMESPACES:
        try:
            mine = os.readlink(f"/proc/self/ns/{ns}")
        except FileNotFoundError:
            continue  # a kernel without this namespace type
        try:
            if os.readlink(f"/proc/{pid}/ns/{ns}") != mine:
                return False
        except OSError:
            return False
    return True


def _become_caller(req: _Request, script: str) -> None:
    """Take on what a cold action would have inherited from the caller."""
    import resource
    import signal

    from podshim.shim import main

    for target, fd in enumerate(req.fds[:3]):
        os.dup2(fd, target)
    os.fchdir(req.fds[3])
    for fd in req.fds:
        os.close(fd)
    os.umask(req.umask)
    os.environ.clear()
    for entry in req.env:
        name, eq, value = entry.partition("=")
        if eq and name:
            os.environ[name] = value
    for limit in (getattr(resource, n) for n in dir(resource) if n.startswith("RLIMIT_")):
        resource.setrlimit(limit, resource.prlimit(req.peer, limit))
    _join_cgroups(req.peer)
    with open(f"/proc/{req.peer}/oom_score_adj") as f, open("/proc/self/oom_score_adj") as own:
        score, current = f.read().strip(), own.read().strip()
    if score != current:  # lowering it needs CAP_SYS_RESOURCE: without, the caller runs cold
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(score)
    main.caller_parent = int(_stat(req.peer)[4])
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    sys.argv = [script, *req.argv[1:]]
    # What a cold start shows in ps and /proc: the interpreter, the script, the flags, the environment.
    _set_proc_strings([sys.executable, script, *req.argv[1:]], req.env)


_KEEP: list[object] = []  # the buffers /proc/self/{cmdline,environ} point at


def _set_proc_strings(argv: list[str], env: list[str]) -> None:
    """Point the kernel's view of our argv and environment (/proc/self/cmdline, environ) at new
    buffers: without it a forked server would show the zygote's. prctl(PR_SET_MM_MAP), which
    needs no capability, with every other field as it is. Where it fails the zygote's stay, and
    ``pgrep -f containerd-shim-podshim`` misses the server (it names ``podshim.shim.zygote``)."""
    import ctypes

    class MmMap(ctypes.Structure):  # struct prctl_mm_map
        _fields_ = (*((name, ctypes.c_uint64) for name in (
            "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
            "arg_start", "arg_end", "env_start", "env_end", "auxv")),
            ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32))  # fmt: skip

    bufs = []
    for strings in (argv, env):
        raw = b"".join(s.encode(errors="surrogateescape") + b"\0" for s in strings) or b"\0"
        bufs.append((ctypes.create_string_buffer(raw, len(raw)), len(raw)))
    _KEEP.extend(bufs)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sbrk.restype = ctypes.c_void_p
    stat = [int(x) if x.isdigit() else 0 for x in _stat("self")]
    (args, args_len), (envs, envs_len) = bufs
    mm = MmMap(
        start_code=stat[26], end_code=stat[27], start_data=stat[45], end_data=stat[46],
        start_brk=stat[47], brk=libc.sbrk(0) or stat[47], start_stack=stat[28],
        arg_start=ctypes.addressof(args), arg_end=ctypes.addressof(args) + args_len,
        env_start=ctypes.addressof(envs), env_end=ctypes.addressof(envs) + envs_len,
        auxv=0, auxv_size=0, exe_fd=0xFFFFFFFF,
    )  # fmt: skip
    libc.prctl(_PR_SET_MM, _PR_SET_MM_MAP, ctypes.byref(mm), ctypes.sizeof(mm), 0)


def _join_cgroups(peer: int) -> None:
    """Move into the caller's cgroups where ours differ, so that a forked server starts where a
    cold one would (``start`` moves it on into ``shim_cgroup`` when that is set)."""
    with open(f"/proc/{peer}/cgroup") as f:
        theirs = f.read().splitlines()
    with open("/proc/self/cgroup") as f:
        mine = set(f.read().splitlines())
    for line in theirs:
        if line not in mine:
            _, controllers, path = line.split(":", 2)
            with open(os.path.join(_cgroup_mount(controllers, path), "cgroup.procs"), "w") as f:
                f.write("0")


def _cgroup_mount(controllers: str, path: str) -> str:
    """The directory of cgroup ``path`` in the hierarchy /proc/<pid>/cgroup calls ``controllers``
    ("" for v2, "cpu,cpuacct" or "name=systemd" for v1)."""
    wanted = set(controllers.split(","))
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, (fstype, _source, options) = left.split(), right.split()[:3]
            if (fstype == "cgroup2" and not controllers) or (
                fstype == "cgroup" and controllers and wanted <= set(options.split(","))
            ):
                return os.path.join(fields[4], os.path.relpath(path, fields[3]))
    raise OSError(errno.ENOENT, f"no cgroup mount for {controllers!r}")


def _worker(conn: socket.socket, script: str) -> None:
    """The forked child for one connection; never returns."""
    import gc

    gc.enable()
    code = 1
    try:
        try:
            req = _receive(conn)
            if req is not None:
                _become_caller(req, script)
        except Exception:
            req = None
        if req is None:
            with contextlib.suppress(OSError):
                conn.send(b"N")
            os._exit(0)
        conn.send(b"R")
        conn.settimeout(5.0)
        if conn.recv(1) != b"G":
            os._exit(0)  # the caller gave up on us and runs the action cold
        _die_with_caller(conn)
        code = _run(req.argv[1:])
    except BaseException:  # pragma: no cover - a bug here must not keep the caller waiting
        code = 1
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)  # containerd waits for EOF on its pipe
            conn.send(bytes([code & 0xFF]))
        os._exit(0)


def _die_with_caller(conn: socket.socket) -> None:
    """If containerd kills the entry point (its deadline), the action dies too, as a cold one
    would: SIGIO, whose default action terminates, arrives when the connection closes."""
    import fcntl

    fcntl.fcntl(conn, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(conn, fcntl.F_SETFL, fcntl.fcntl(conn, fcntl.F_GETFL) | os.O_ASYNC)


def _run(args: list[str]) -> int:
    import traceback

    from podshim.shim import main

    try:
        return main.run(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()  # what a cold action prints before it exits 1
        return 1


if __name__ == "__main__":
    serve(sys.argv[1:])
    os._exit(0)
