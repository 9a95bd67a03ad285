"""Run every pytest session inside a private mount namespace with a private /run.

containerd 1.6's runc shim, ctr and runc hard-code /run/containerd/{s,fifo,runc}; the e2e tests start
their own containerd, and a private /run is the only way to keep those paths off the host's (a
system containerd, or other test sessions, may be using them).

How: when pytest starts in the host's namespace, the first hook re-executes the same command
(same interpreter, sys.argv and cwd; same pid, so the exit code and signals pass straight through)
as `unshare --mount --propagation private -- <python> <argv>` with PODSHIM_TEST_NS=1. In there, an
empty temp dir is bind-mounted over /run. Nothing else changes, so unit tests run as before. Without
root (or without unshare) there is no re-exec: unit tests still run, and the e2e fixtures explain why
they cannot.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

NS_MARKER = "PODSHIM_TEST_NS"
RUN_DIR_ENV = "PODSHIM_TEST_RUN_DIR"
# The mount namespace pytest was started in. The child compares its own with it before mounting:
# /proc/1/ns/mnt cannot be the reference, it is unreadable even for root on some machines (this VM).
HOST_NS_ENV = "PODSHIM_TEST_HOST_MNT_NS"

_created_run_dir: str | None = None


def _child_argv(config: pytest.Config) -> list[str]:
    args = list(config.invocation_params.args)
    argv0 = sys.argv[0]
    if (
        sys.argv[1:] == args
        and os.path.isfile(argv0)
        and os.path.basename(argv0) != "__main__.py"
    ):
        # Started as a script (.venv/bin/pytest): run that script again, so sys.argv is identical.
        return [sys.executable, argv0, *args]
    # `python -m pytest`, or pytest.main(args) from some other program: args are what pytest saw.
    return [sys.executable, "-m", "pytest", *args]


def _reexec_in_private_namespace(config: pytest.Config) -> None:
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        return
    # pytest has already redirected fds 1 and 2 into its capture files; give the child the real ones.
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.stop_global_capturing()
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(config.invocation_params.dir)
    env = dict(os.environ, **{NS_MARKER: "1", HOST_NS_ENV: os.readlink("/proc/self/ns/mnt")})
    env.pop(RUN_DIR_ENV, None)  # inherited from an outer session: not ours
    argv = [unshare, "--mount", "--propagation", "private", "--", *_child_argv(config)]
    os.execve(unshare, argv, env)


def _bind_private_run() -> None:
    global _created_run_dir
    if os.environ.get(RUN_DIR_ENV):
        return  # a nested pytest: /run is already ours
    if os.environ.get(HOST_NS_ENV, "") in ("", os.readlink("/proc/self/ns/mnt")):
        # The marker was set by hand, not by our re-exec: mounting here could hide the host's /run.
        raise pytest.UsageError(f"{NS_MARKER}=1 is set but this is not a private mount namespace; unset it")
    run_dir = tempfile.mkdtemp(prefix="podshim-run-")
    subprocess.run(["mount", "--bind", run_dir, "/run"], check=True)
    os.environ[RUN_DIR_ENV] = run_dir
    _created_run_dir = run_dir
    # `timeout`, CI cancellation: SIGTERM would kill us outright and leave containerd, shims and
    # cgroups behind. As KeyboardInterrupt, pytest still tears the session fixtures down.
    signal.signal(signal.SIGTERM, signal.default_int_handler)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    if os.environ.get(NS_MARKER) != "1":
        _reexec_in_private_namespace(config)  # returns only when re-execution is impossible
        return
    _bind_private_run()


def pytest_unconfigure(config: pytest.Config) -> None:
    # The namespace dies with its last process, taking the bind mount along; only the dir remains.
    if _created_run_dir is not None:
        shutil.rmtree(_created_run_dir, ignore_errors=True)
