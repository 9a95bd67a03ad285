"""A private containerd whose root, state, sockets and log all live in one temp dir.

It must run inside the test session's private mount namespace (see the root conftest.py): the shims
and ctr hard-code /run/containerd/{s,fifo,runc}, and only a private /run keeps those off the host.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[3]
VENV_BIN = REPO_ROOT / ".venv" / "bin"

CRI_PLUGIN = "io.containerd.grpc.v1.cri"
# Plugins that would touch the host (/opt/containerd, modprobe, block devices) or only add noise.
DEFAULT_DISABLED = (
    "io.containerd.internal.v1.opt",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
)

_MNT_DETACH = 2
# podshim.shim.loopcheck's variable and mark, spelled out: the harness does not import the shim.
LOOP_CHECK_ENV = "PODSHIM_LOOP_BLOCK_MS"
LOOP_CHECK_MS = "50"
LOOP_BLOCKED_MARK = "podshim: the event loop was blocked"

# podshim's entry point, as containerd finds it on its PATH: "warm" is what setup.sh installs (the
# C entry point that hands actions to a zygote, podshim/shim/entry.c); "cold" puts the Python entry
# point first under the same name (setup.sh's podshim-cold dir), as on a machine without gcc.
# scripts/test.sh runs the differential tests both ways.
SHIM_MODE_ENV = "PODSHIM_SHIM_MODE"
SHIM_MODES = ("warm", "cold")
PODSHIM_BINARY = "containerd-shim-podshim-v1"
# The Python entry point under the shim's name, where the C one falls back to it.
PODSHIM_COLD_DIR = VENV_BIN / "podshim-cold"


def default_shim_mode() -> str:
    mode = os.environ.get(SHIM_MODE_ENV) or "warm"
    if mode not in SHIM_MODES:
        raise ValueError(f"{SHIM_MODE_ENV}={mode!r}: one of {SHIM_MODES}")
    return mode


def c_entry_point_built() -> bool:
    """Whether setup.sh built the C entry point (it needs gcc); without it "warm" runs cold."""
    with open(VENV_BIN / PODSHIM_BINARY, "rb") as f:
        return f.read(4) == b"\x7fELF"


def private_run_dir() -> str | None:
    """$PODSHIM_TEST_RUN_DIR if /run is currently a bind mount of it (the root conftest.py's doing)."""
    run_dir = os.environ.get("PODSHIM_TEST_RUN_DIR", "")
    if not run_dir:
        return None
    root_of_run = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            if fields[4] == "/run":
                root_of_run = fields[3]  # the last one wins: it is the mount on top
    # `root` is relative to the source filesystem: /tmp/x on the root fs, /x on a tmpfs /tmp.
    if root_of_run is None or root_of_run == "/" or not run_dir.endswith(root_of_run):
        return None
    return run_dir


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def mounts_under(prefix: Path) -> list[str]:
    """Mount points at or below `prefix` in this mount namespace, deepest first."""
    root = str(prefix).rstrip("/")
    found: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with spaces and the like escaped as octal.
            mp = line.split(" ")[4].encode().decode("unicode_escape")
            if mp == root or mp.startswith(root + "/"):
                found.append(mp)
    return sorted(set(found), key=lambda m: m.count("/"), reverse=True)


def umount_all_under(prefix: Path) -> list[str]:
    """Lazily unmount everything at or below `prefix`; returns what was unmounted."""
    libc = ctypes.CDLL(None, use_errno=True)
    done: list[str] = []
    # Loop because a mount can hide another one at the same path.
    for _ in range(32):
        mps = mounts_under(prefix)
        if not mps:
            break
        for mp in mps:
            if libc.umount2(mp.encode(), _MNT_DETACH) == 0:
                done.append(mp)
    return done


class PrivateContainerd:
    """One containerd process with everything under `base`.

    The layout: base/{config.toml, containerd.log, c.sock, c.sock.ttrpc, debug.sock, root/, state/}.
    Stopping does not remove the dir, so `restart()` and `start()` after `stop()` find the same state.
    """

    def __init__(
        self,
        base: Path | None = None,
        *,
        enable_cri: bool = False,
        extra_config: str = "",
        log_level: str = "debug",
        extra_path: Sequence[Path] = (VENV_BIN,),
        shim_mode: str | None = None,
    ) -> None:
        self.base = Path(base) if base is not None else Path(tempfile.mkdtemp(prefix="podshim-ctrd-"))
        self.base.mkdir(parents=True, exist_ok=True)
        self.enable_cri = enable_cri
        self.extra_config = extra_config
        self.log_level = log_level
        self.extra_path = list(extra_path)
        self.shim_mode = shim_mode or default_shim_mode()
        # The tests' check that no shim blocks its loop (off for the bench: it patches every
        # callback, which costs a request a few tens of µs).
        self.loop_check = True
        self.root = self.base / "root"
        self.state = self.base / "state"
        self.address = str(self.base / "c.sock")
        self.ttrpc_address = self.address + ".ttrpc"
        self.debug_address = str(self.base / "debug.sock")
        self.config_path = self.base / "config.toml"
        self.log_path = self.base / "containerd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: int | None = None

    # -- configuration ---------------------------------------------------------------------------

    def disabled_plugins(self) -> list[str]:
        disabled = list(DEFAULT_DISABLED)
        if not self.enable_cri:
            disabled.append(CRI_PLUGIN)
        return disabled

    def render_config(self) -> str:
        disabled = ", ".join(_toml_str(p) for p in self.disabled_plugins())
        return "\n".join(
            [
                "version = 2",
                f"root = {_toml_str(str(self.root))}",
                f"state = {_toml_str(str(self.state))}",
                f"disabled_plugins = [{disabled}]",
                "",
                "[grpc]",
                f"  address = {_toml_str(self.address)}",
                "",
                "[ttrpc]",
                f"  address = {_toml_str(self.ttrpc_address)}",
                "",
                "[debug]",
                f"  address = {_toml_str(self.debug_address)}",
                f"  level = {_toml_str(self.log_level)}",
                "",
                self.extra_config,
                "",
            ]
        )

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Shims inherit containerd's environment: each reports callbacks that block its loop
        # for longer than this (podshim.shim.loopcheck), and the fixtures fail the test.
        if self.loop_check:
            env.setdefault(LOOP_CHECK_ENV, LOOP_CHECK_MS)
        else:
            env.pop(LOOP_CHECK_ENV, None)
        # containerd resolves containerd-shim-<name>-<ver> via its PATH, so put the venv's first.
        path = [str(p) for p in self.extra_path]
        if self.shim_mode == "cold":
            path.insert(0, str(PODSHIM_COLD_DIR))
        env["PATH"] = os.pathsep.join([*path, env.get("PATH", "/usr/bin:/bin")])
        env.pop(SHIM_MODE_ENV, None)
        return env

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def is_running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = 30.0) -> None:
        if self.is_running():
            raise RuntimeError("containerd is already running")
        if private_run_dir() is None:
            raise RuntimeError(
                "refusing to start containerd: /run is not the test session's private bind mount; run the "
                "tests through pytest (the root conftest.py re-executes it under `unshare --mount`)"
            )
        for d in (self.root, self.state):
            d.mkdir(parents=True, exist_ok=True)
        for stale in (self.address, self.ttrpc_address, self.debug_address):
            Path(stale).unlink(missing_ok=True)
        self.config_path.write_text(self.render_config())
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(log_fd, f"===== podshim tests: starting containerd at {time.ctime()} =====\n".encode())
        try:
            # cwd = base: containerd looks for shim binaries in its cwd first (spec §1.1), keep that empty.
            self._proc = subprocess.Popen(
                ["containerd", "--config", str(self.config_path)],
                cwd=self.base,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"containerd exited with {self._proc.returncode} during start-up:\n{self.log_tail(60)}"
                )
            if _connectable(self.address) and _connectable(self.ttrpc_address):
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"containerd did not listen on {self.address} within {timeout}s:\n{self.log_tail(60)}"
        )

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM containerd and wait for it. Shims and containers deliberately survive this."""
        proc = self._proc
        self._proc = None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        """Stop, unmount whatever is left under the dir (overlay snapshots, rootfs) and remove it."""
        self.stop()
        umount_all_under(self.base)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PrivateContainerd:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- diagnostics -----------------------------------------------------------------------------

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def blocked_loop_reports(self, since: int = 0) -> list[str]:
        """The shims' reports of a blocked event loop in the log, from byte ``since`` on."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                data = f.read()
        except FileNotFoundError:
            return []
        return [line for line in data.decode(errors="replace").splitlines() if LOOP_BLOCKED_MARK in line]

    def log_tail(self, lines: int = 100, since: int = 0) -> str:
        """The last `lines` lines of the log, optionally only what was written after byte `since`."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                data = f.read()
        except FileNotFoundError:
            return "(no containerd log)"
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def _connectable(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
