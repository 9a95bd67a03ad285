"""The guest agent's diagnostics operations (Diag's guest side): its threads' stacks, a command
run in the guest itself (not in a container), and a shared host path bind-mounted into the
guest.  A mixin of :class:`podshim.guest.agent.Agent`; standard library only.

Only the shim sends these: the channel is the shim's, and the shim serves them only to its own
admin (the Diag peer check).  Still, a target path is checked here as well as on the host.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import threading
from typing import Any

from podshim.guest.paths import SHARE_DIR
from podshim.guest.reaper import run
from podshim.guest.stacks import thread_stacks
from podshim.system.children import Exit

MOUNT = "/bb/mount"
SHARED_ROOT = SHARE_DIR + "/"
RESERVED = ("/run/podshim", "/usr", "/proc", "/sys", "/dev", "/bb", "/init")
# The guest layer has python and crun, not coreutils: the tools are busybox applets in /bb.
EXEC_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/bb"


class DiagError(Exception):
    kind = "invalid_argument"


class DiagNotFound(DiagError):
    kind = "not_found"


class DiagOps:
    """Needs from the agent: ``reaper`` (the guest's Reaper), its error classes, ``add_stream``, ``_lock``
    and ``_in``."""

    reaper: Any
    # The agent's own error classes, so that its answers carry the right kind.
    invalid_argument: type[Exception] = DiagError
    not_found: type[Exception] = DiagNotFound
    failure: type[Exception] = DiagError
    _lock: threading.Lock
    _in: dict[int, Any]

    def add_stream(self, direction: str, sid: int, fd: int) -> None: ...  # pragma: no cover

    def _diag_exits(self) -> dict[int, tuple[threading.Event, list[int]]]:
        exits: dict[int, tuple[threading.Event, list[int]]] = self.__dict__.setdefault("_diag_exit_map", {})
        return exits

    def op_diag_stacks(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"stacks": thread_stacks()}

    def op_diag_exec(self, req: dict[str, Any]) -> dict[str, Any]:
        argv = [str(a) for a in req.get("args") or []]
        if not argv:
            raise self.invalid_argument("exec needs a command")
        env = {"PATH": EXEC_PATH, **{str(k): str(v) for k, v in (req.get("env") or {}).items()}}
        exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env["PATH"])
        if exe is None or not os.access(exe, os.X_OK):
            raise self.not_found(f"{argv[0]}: no such executable in the guest (PATH={env['PATH']})")
        stdio = req.get("stdio") or {}
        sids = {k: int(stdio.get(k) or 0) for k in ("stdin", "stdout", "stderr")}
        child: dict[int, int] = {}
        parent: list[tuple[str, int, int]] = []
        if stdio.get("terminal"):
            master, slave = os.openpty()
            width, height = int(req.get("width") or 0), int(req.get("height") or 0)
            if width and height:
                import fcntl
                import struct
                import termios

                fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
            env.setdefault("TERM", "xterm")
            child = {0: slave, 1: slave, 2: slave}
            if sids["stdout"]:
                parent.append(("out", sids["stdout"], os.dup(master)))
            if sids["stdin"]:
                parent.append(("in", sids["stdin"], os.dup(master)))
            os.close(master)
        else:
            for fd, key in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
                if not sids[key]:
                    continue
                r, w = os.pipe()
                child[fd] = r if fd == 0 else w
                parent.append(("in" if fd == 0 else "out", sids[key], w if fd == 0 else r))
        done = threading.Event()
        result: list[int] = []

        def exited(ex: Exit) -> None:
            result.append(ex.status)
            done.set()

        try:
            pid = self.reaper.track(lambda: _spawn(exe, argv, child, env), exited)
        except OSError as e:
            for _, _, fd in parent:
                os.close(fd)
            raise self.failure(f"cannot run {argv[0]} in the guest: {e}") from e
        finally:
            for fd in set(child.values()):
                os.close(fd)
        self._diag_exits()[pid] = (done, result)
        for direction, sid, fd in parent:
            self.add_stream(direction, sid, fd)
        if sids["stdin"]:
            self.__dict__.setdefault("_diag_stdin", {})[pid] = sids["stdin"]
        return {"pid": pid}

    def op_diag_wait(self, req: dict[str, Any]) -> dict[str, Any]:
        pid = int(req.get("pid") or 0)
        entry = self._diag_exits().get(pid)
        if entry is None:
            raise self.not_found(f"no diagnostic exec with pid {pid}")
        done, result = entry
        done.wait()
        self._diag_exits().pop(pid, None)
        sid = self.__dict__.get("_diag_stdin", {}).pop(pid, 0)
        if sid:
            # Its reader is gone: end the stdin writer thread too.
            with self._lock:
                inp = self._in.get(sid)
            if inp is not None:
                inp.close()
        return {"exit_code": result[0]}

    def op_diag_share(self, req: dict[str, Any]) -> dict[str, Any]:
        source = str(req.get("source") or "")
        target = str(req.get("target") or "")
        if not source.startswith(SHARED_ROOT) or ".." in source.split("/"):
            raise self.invalid_argument(f"share source {source!r} is not in the pod share")
        norm = posixpath.normpath(target) if target.startswith("/") and "\0" not in target else ""
        if not norm or norm == "/" or any(norm == r or norm.startswith(r + "/") for r in RESERVED):
            raise self.invalid_argument(f"share target {target!r} is not allowed")
        if req.get("directory"):
            os.makedirs(norm, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(norm), exist_ok=True)
            with contextlib.suppress(FileExistsError):
                open(norm, "x").close()
        self.run_helper([MOUNT, "--bind", source, norm])
        if not req.get("writable"):
            self.run_helper([MOUNT, "-o", "remount,bind,ro", norm])
        return {}

    def run_helper(self, argv: list[str]) -> None:
        status, _ = run(argv)
        if status != 0:
            raise self.failure(f"{' '.join(argv)} failed with status {status}")


def _spawn(exe: str, argv: list[str], fds: dict[int, int], env: dict[str, str]) -> int:
    """posix_spawn in a session of its own (a shell then has its terminal); the agent's reaper
    finds the exit (its claim takes an exit reaped before it)."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, fds.get(i, devnull), i) for i in (0, 1, 2)]
        return os.posix_spawn(exe, argv, env, file_actions=actions, setsid=True)
    finally:
        os.close(devnull)
