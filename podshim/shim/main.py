"""``containerd-shim-podshim-v1``: the ``start`` and ``delete`` actions containerd runs, and
the server that ``start`` forks (spec §1)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from typing import TYPE_CHECKING

from podshim import errdefs, ids, oci
from podshim.shim import address

if TYPE_CHECKING:
    from podshim import options

# Imports are deferred to the action that needs them: every container pays for an interpreter
# start in `start` and another in `delete`, so each action loads only its own modules.

VERSION = "0.1.0"
PANIC_LOG = "panic.log"

# The process that ran this action (containerd): our parent, except in a zygote's worker, which
# runs the action on behalf of the entry point containerd started (zygote.py).
caller_parent = 0


class Args:
    """The flags containerd passes (a plain class: dataclasses costs the lean paths ~6 ms)."""

    def __init__(self, **values: object) -> None:
        self.namespace = ""
        self.address = ""
        self.publish_binary = "containerd"
        self.id = ""
        self.bundle = ""
        self.socket = ""
        self.debug = False
        self.version = False
        self.action = ""
        for key, value in values.items():
            if not hasattr(self, key):
                raise TypeError(f"unknown flag {key}")
            setattr(self, key, value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Args) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"Args({vars(self)})"


_VALUE_FLAGS = {"namespace", "address", "publish-binary", "id", "bundle", "socket"}
_BOOL_FLAGS = {"debug": "debug", "v": "version"}


class UsageError(Exception):
    pass


def parse_args(argv: list[str]) -> Args:
    """Go's flag package conventions (spec §1.2): ``-name value`` or ``-name=value`` (one or two
    dashes), bare booleans, flags end at the first positional argument, which is the action.
    Hand-written: argparse alone costs each action ~3 ms and ~1.4 MiB."""
    args = Args()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            rest = argv[i + 1 :] if arg == "--" else argv[i:]
            args.action = rest[0] if rest else ""
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            setattr(args, _BOOL_FLAGS[name], value.lower() not in ("false", "0") if eq else True)
        elif name in _VALUE_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
            setattr(args, name.replace("-", "_"), value)
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    code = run(args)
    if code == 0 and args[-1:] == ["start"]:
        from podshim.shim import zygote

        zygote.spawn_if_missing(sys.argv[0])
    _exit_now(code)


def run(argv: list[str]) -> int:
    """One action, as containerd asked for it: the cold path (:func:`main`) and the zygote's
    workers (zygote.py) both come through here."""
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    if args.version:
        print(f"containerd-shim-podshim-v1 version {VERSION}")
        return 0
    if args.action == "start":
        return start(args)
    if args.action == "delete":
        return delete(args)
    print(f"unknown action {args.action!r}: containerd runs 'start' and 'delete'", file=sys.stderr)
    return 2


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown (module and object finalisation): containerd
    waits for these actions, and there is nothing to flush but stdout."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _read_spec(bundle: str) -> dict[str, object]:
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            spec = json.load(f)
        return spec if isinstance(spec, dict) else {}
    except (OSError, ValueError):
        return {}


def start(args: Args) -> int:
    bundle = os.getcwd()
    spec = _read_spec(bundle)
    try:
        # The key names the socket every container of the group finds; a client writes it.
        ids.check_task_id(args.id)
        key = oci.grouping_key(spec, args.id)
    except errdefs.ShimError as e:
        sys.stderr.write(f"{e}\n")
        return 1
    path = args.socket or address.socket_path(args.address, args.namespace, key, bundle)
    addr = "unix://" + path
    listener = address.listen(path)
    if listener is None:
        # A live shim serves this pod already (it holds the socket's lock): this container lands on it.
        address.write_address_file(bundle, addr)
        sys.stdout.write(addr)
        return 0
    from podshim import options

    stdin_opts = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
    start_options = options.decode_stdin(stdin_opts)
    address.write_address_file(bundle, addr)
    # Fork rather than exec: the child inherits an interpreter with everything imported.
    load_server_modules()
    pid = os.fork()
    if pid == 0:
        _run_server(listener, args, path, bundle, start_options)
    # The server holds the lock now (the same open file); this process lets go of its copy.
    listener.close()
    _adopt(pid, start_options)
    sys.stdout.write(addr)
    sys.stdout.flush()
    return 0


def load_server_modules() -> None:
    """Import the server's modules (before a fork, so that the server starts warm).

    asyncio imports ssl if it can; the shim speaks only over unix sockets, and ssl costs every
    shim ~4 ms and ~1.4 MiB.  asyncio works without it."""
    blocked = "ssl" not in sys.modules
    if blocked:
        sys.modules["ssl"] = None  # type: ignore[assignment]
    import podshim.shim.daemon  # noqa: F401

    if blocked:
        del sys.modules["ssl"]  # whatever needs it later (pyroute2, for VM pods) may load it


SERVER_SOCKET_FD = 3
SERVER_LOCK_FD = 4


def _run_server(
    listener: address.Listener, args: Args, path: str, bundle: str, start_options: options.ShimOptions
) -> None:
    """The forked child: detach from containerd's pipes and session, then serve until shutdown."""
    code = 1
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        # Whatever containerd (or its parent) leaked to us would be held for the shim's life.
        # The socket and the lifetime lock go to fixed descriptors, close-on-exec: no child
        # program may hold the lock (it would outlive us) or the listening socket.
        import fcntl

        # Out of the way first, so that neither lands on the other's fixed number.
        moved = []
        for ours in (listener.sock.detach(), listener.lock_fd):
            moved.append(fcntl.fcntl(ours, fcntl.F_DUPFD_CLOEXEC, 16))
            os.close(ours)
        for temp, fixed in zip(moved, (SERVER_SOCKET_FD, SERVER_LOCK_FD), strict=True):
            os.dup2(temp, fixed, inheritable=False)
            os.close(temp)
        sock = socket.socket(fileno=SERVER_SOCKET_FD)
        os.closerange(SERVER_LOCK_FD + 1, os.sysconf("SC_OPEN_MAX"))
        import asyncio

        from podshim.shim import daemon

        daemon.setup_logging(bundle, args.debug, args.id)
        code = asyncio.run(
            daemon.serve(
                sock, namespace=args.namespace, socket_path=path, start_options=start_options, bundle=bundle
            )
        )
    except BaseException:
        _panic(bundle)
    finally:
        os._exit(code)


def _panic(bundle: str) -> None:
    """Dying of an unhandled exception: the traceback goes to the log FIFO and to
    ``<bundle>/panic.log``, which the ``delete`` action copies into containerd's log."""
    import traceback

    text = traceback.format_exc()
    with contextlib.suppress(Exception):
        from podshim.shim import logfmt

        os.write(2, logfmt.fatal_line("shim panic: " + text).encode(errors="replace"))
    with contextlib.suppress(OSError), open(os.path.join(bundle, PANIC_LOG), "w") as f:
        f.write(text)


def _adopt(pid: int, opts: options.ShimOptions) -> None:
    """What runc-v2's start does for its server: shim cgroup, and oom_score_adj one above containerd's."""
    if opts.shim_cgroup:
        with contextlib.suppress(OSError):
            _join_cgroup(pid, opts.shim_cgroup)
    try:
        with open(f"/proc/{caller_parent or os.getppid()}/oom_score_adj") as f:
            parent_score = int(f.read().strip())
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(min(parent_score + 1, 1000)))
    except (OSError, ValueError):
        pass


def _join_cgroup(pid: int, cgroup: str) -> None:
    from podshim.system.cgroups import CGROUP_ROOT, unified_host

    if unified_host():
        dirs = [os.path.join(CGROUP_ROOT, cgroup.lstrip("/"))]
    else:
        dirs = [
            os.path.join(CGROUP_ROOT, c, cgroup.lstrip("/"))
            for c in os.listdir(CGROUP_ROOT)
            if os.path.isdir(os.path.join(CGROUP_ROOT, c)) and c != "unified"
        ]
    for d in dirs:
        with contextlib.suppress(OSError):
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(pid))


def delete(args: Args) -> int:
    """Clean up one container after containerd lost it or deleted it: idempotent, under 5 s,
    and never touching a server that still serves other containers (spec §1.5).

    After a normal Delete the server has already removed the container and its mounts, so each
    step first checks, cheaply, whether there is anything left to do."""
    import time

    from google.protobuf.timestamp_pb2 import Timestamp

    from podshim.api import task_pb2
    from podshim.options import ShimOptions

    bundle = args.bundle or os.getcwd()
    try:
        with open(os.path.join(bundle, "options.json")) as f:
            opts = ShimOptions.from_json(f.read())
    except (OSError, ValueError):
        opts = ShimOptions()
    from podshim.backends.host import leftovers

    try:
        leftovers.clean_up_after_shim(bundle)  # a host process's cgroup (and every process in it)
    except OSError as e:
        sys.stderr.write(f"clean up host process {args.id}: {e}\n")
    root = os.path.join(opts.root or "/run/containerd/runc", args.namespace)
    valid_id = not ids.problem(args.id)  # else no shim was started for it: nothing to clean up
    if valid_id and os.path.exists(os.path.join(root, args.id)):
        _runc_force_delete(opts.binary_name or "runc", root, bundle, args.id)
    rootfs = os.path.join(bundle, "rootfs")
    if _has_mounts_under(rootfs):
        from podshim.system import mounts

        try:
            mounts.unmount_all(rootfs)
        except OSError as e:
            sys.stderr.write(f"unmount rootfs: {e}\n")
    try:
        key = oci.grouping_key(_read_spec(bundle), args.id) if valid_id else ""
    except errdefs.ShimError:
        key = ""
    socket_path = address.socket_path(args.address, args.namespace, key, bundle) if key else ""
    if key and os.path.isdir(os.environ.get("PODSHIM_VM_RUN_DIR") or "/run/podshim/vm"):
        from podshim.vm.qemu import clean_up_after_shim  # a dead VM pod's shares, qemu and run dir

        clean_up_after_shim(key, args.id, shim_gone=not address.is_served(socket_path))
    if key:
        address.remove_if_dead(socket_path)
    pid = 0
    with contextlib.suppress(OSError, ValueError), open(os.path.join(bundle, "init.pid")) as f:
        pid = int(f.read().strip())
    _report_panic(bundle, args.id)
    ts = Timestamp()
    ts.FromNanoseconds(time.time_ns())
    resp = task_pb2.DeleteResponse(pid=pid, exit_status=128 + 9, exited_at=ts)
    sys.stdout.buffer.write(resp.SerializeToString())
    sys.stdout.flush()
    return 0


def _report_panic(bundle: str, cid: str) -> None:
    """containerd logs what this action writes to stderr ("cleanup warnings"): a shim that died
    of an exception left its traceback in the bundle it started in."""
    try:
        with open(os.path.join(bundle, PANIC_LOG), errors="replace") as f:
            text = f.read(64 * 1024)
    except OSError:
        return
    if text:
        sys.stderr.write(f"found the shim's {PANIC_LOG} while deleting {cid}:\n{text}\n")


def _runc_force_delete(binary: str, root: str, bundle: str, cid: str) -> None:
    import subprocess

    argv = [binary, "--root", root, "--log", os.path.join(bundle, "log.json"), "--log-format", "json",
            "delete", "--force", cid]  # fmt: skip
    try:
        res = subprocess.run(argv, capture_output=True, timeout=3.5, check=False)
        if res.returncode != 0 and b"does not exist" not in res.stderr:
            sys.stderr.write(f"runc delete --force {cid}: {res.stderr.decode(errors='replace')}\n")
    except (OSError, subprocess.TimeoutExpired) as e:
        sys.stderr.write(f"runc delete --force {cid}: {e}\n")


def _has_mounts_under(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split(" ", 5)[4]
            if point == path or point.startswith(path + "/"):
                return True
    return False
