"""The gate a host process waits behind between Create and Start: a separate, stdlib-only
program, never a fork of the shim.

The shim ``posix_spawn``s it (with its own session, default signal dispositions and an empty
signal mask) and hands it exactly these descriptors:

    0, 1, 2   the workload's stdio (or its pty slave on all three)
    3         the launch spec, a ``marshal``led dict (no import to decode it), in a memfd
    4         the gate: one byte ``x`` runs the workload; EOF means "dropped": exit 0
    5         errors: a message, then exit 127; closed by a successful exec

It applies the spec (controlling tty, rlimits, groups, gid, uid, working directory), waits at
the gate, then execs the workload in its own place, so the pid the shim reported at Create is the
workload's.  The shim moves it into the container's cgroup before Create returns.  A signal sent
to it before Start acts on it alone, as on any process, and never reaches the shim.

Run as ``python -I -S -c <this source>``: the shim reads the source when it loads the host
backend, so a running shim keeps launching the code it was started with.
"""

from __future__ import annotations

import marshal
import os
import signal

SPEC_FD = 3
GATE_FD = 4
ERROR_FD = 5


# rt_sigaction, for the two signals glibc keeps to itself.
_RT_SIGACTION = {"x86_64": 13, "aarch64": 134}


def _default_signals() -> None:
    """Every signal at its default, as in a fresh process: an ignored signal stays ignored
    across exec.  Python's start-up ignores SIGPIPE and SIGXFSZ (and handles SIGINT), and glibc's
    posix_spawn leaves its internal signals 32 and 33 ignored, which its sigaction refuses to
    change: those go to the kernel directly."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with open("/proc/self/status") as f:
        ignored = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
    valid = signal.valid_signals()
    reserved = []
    for sig in range(1, ignored.bit_length() + 1):
        if ignored >> (sig - 1) & 1:
            if sig in valid:
                signal.signal(sig, signal.SIG_DFL)
            else:
                reserved.append(sig)
    nr = _RT_SIGACTION.get(os.uname().machine)
    if reserved and nr is not None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        default = ctypes.create_string_buffer(32)  # SIG_DFL, no flags, empty mask: zeros in any layout
        for sig in reserved:
            libc.syscall(nr, sig, default, None, 8)


def _prepare(spec: dict[str, object]) -> None:
    _default_signals()
    if spec.get("tty"):
        import fcntl
        import termios

        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    rlimits: list[tuple[int, int, int]] = spec.get("rlimits") or []  # type: ignore[assignment]
    if rlimits:
        import resource

        for res, soft, hard in rlimits:
            resource.setrlimit(res, (soft, hard))
    if spec.get("gid") is not None:
        os.setgroups(spec.get("groups") or [])  # type: ignore[arg-type]
        os.setgid(spec["gid"])  # type: ignore[arg-type]
    if spec.get("uid") is not None:
        os.setuid(spec["uid"])  # type: ignore[arg-type]
    os.chdir(str(spec["cwd"]))


def main() -> None:
    args: list[str] = []
    try:
        with os.fdopen(SPEC_FD, "rb") as f:
            spec = marshal.loads(f.read())
        args = [str(a) for a in spec["args"]]
        _prepare(spec)
        if os.read(GATE_FD, 1) != b"x":
            os._exit(0)  # the shim dropped this process: it never runs
        os.close(GATE_FD)
        os.set_inheritable(ERROR_FD, False)
        # Nothing but stdio (and the error pipe, until exec) may reach the workload.
        os.closerange(3, ERROR_FD)
        os.closerange(ERROR_FD + 1, os.sysconf("SC_OPEN_MAX"))
        os.execvpe(args[0], args, {str(k): str(v) for k, v in spec["env"].items()})
    except BaseException as e:
        msg = f"{e}" if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        try:
            os.write(ERROR_FD, f"exec {args[0] if args else '?'}: {msg}".encode())
        finally:
            os._exit(127)


if __name__ == "__main__":
    main()
