"""The shim binary's two actions, `start` and `delete`, run by the bench itself as containerd would.

containerd pays for both on every container: `start` before the first RPC and `delete` after
the last (spec §1.3, §1.5: the `delete` action runs whenever containerd closes its connection).
Here they run against a fake bundle (a spec with no annotations, the `log` FIFO held open like
containerd does), so each action is timed alone, for both shims, with nothing else in the way:

  * `start`: exec → address on stdout → exit and EOF (containerd waits for both);
  * the server it leaves behind, before any Create: the interpreter's true baseline memory;
  * `delete`: exec → exit, for a container runc does not know (its fast path).

The fake bundles live under a state dir of their own (<containerd dir>/actions), so containerd
never sees them; podshim's socket goes to <that dir>/s, runc-v2's to the private /run/containerd/s.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import empty_pb2

from bench.env import PODSHIM, RUNTIMES, Env, Runtime, shim_env, wait_for_zygote
from bench.procs import Memory
from bench.ttrpc_raw import RawClient, RpcError
from podshim.api import task_pb2

IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)\s*$")


@dataclass
class FakeBundle:
    path: Path
    task_id: str
    namespace: str
    log_fd: int

    def drain_log(self) -> bytes:
        out = bytearray()
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.log_fd, 65536):
                out += chunk
        return bytes(out)

    def remove(self) -> None:
        os.close(self.log_fd)
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass(frozen=True)
class Variant:
    """A shim binary to run the actions of: a real runtime's, or a what-if (bench/whatif.py)."""

    name: str
    binary: str  # argv[0]: a name looked up in containerd's PATH, or an absolute path
    env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, rt: Runtime, env: Mapping[str, str] | None = None) -> Variant:
        return cls(rt.name, rt.binary, dict(env or {}))

    @property
    def basename(self) -> str:
        return os.path.basename(self.binary)


def make_bundle(env: Env, task_id: str, sandbox: str = "") -> FakeBundle:
    """A bundle with an empty spec; `sandbox` makes it a CRI container of that pod (same shim)."""
    namespace = env.ctr.namespace
    path = env.scratch / "actions" / "io.containerd.runtime.v2.task" / namespace / task_id
    path.mkdir(parents=True)
    annotations = json.dumps({"io.kubernetes.cri.sandbox-id": sandbox} if sandbox else {})
    (path / "config.json").write_text(f'{{"ociVersion": "1.0.2", "annotations": {annotations}}}')
    # What each shim's Create leaves for its `delete` action: runc-v2 fails without `runtime`
    # (the runc binary name, empty = runc); podshim falls back to defaults without options.json.
    (path / "runtime").write_text("")
    os.mkfifo(path / "log", 0o700)
    # containerd opens the FIFO O_RDWR|O_NONBLOCK before running start: a shim may open it for
    # writing without blocking, and what it writes stays readable here.
    fd = os.open(path / "log", os.O_RDWR | os.O_NONBLOCK)
    return FakeBundle(path, task_id, namespace, fd)


def _argv(env: Env, rt: Variant, b: FakeBundle, action: str) -> list[str]:
    argv = [rt.binary, "-namespace", b.namespace, "-address", env.cd.address]
    argv += ["-publish-binary", "containerd", "-id", b.task_id]
    if action == "delete":
        argv += ["-bundle", str(b.path)]
    return [*argv, action]


@dataclass
class StartTiming:
    to_address: float  # exec → first bytes of the address on stdout
    to_exit: float  # exec → exit and EOF: what containerd waits for
    address: str
    stderr: str = ""


def run_start(
    env: Env, rt: Variant, b: FakeBundle, extra_env: Mapping[str, str] = {}, merge_stderr: bool = True
) -> StartTiming:
    environ = {**shim_env(env.cd), **rt.env, **extra_env}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        _argv(env, rt, b, "start"),
        cwd=b.path,
        env=environ,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    out = bytearray()
    t_addr = 0.0
    while chunk := os.read(proc.stdout.fileno(), 65536):
        if not out:
            t_addr = time.perf_counter() - t0
        out += chunk
    rc = proc.wait()
    t_exit = time.perf_counter() - t0
    proc.stdout.close()
    err = ""
    if proc.stderr is not None:
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    text = out.decode(errors="replace").strip()
    if rc != 0 or not text.startswith("unix://"):
        raise RuntimeError(f"{rt.binary} start failed (rc={rc}): {text!r} {err[-2000:]}")
    return StartTiming(t_addr, t_exit, text, err)


def run_delete(env: Env, rt: Variant, b: FakeBundle, extra_env: Mapping[str, str] = {}) -> tuple[float, str]:
    """Seconds to exit, and stderr (where `-X importtime` writes)."""
    environ = {**shim_env(env.cd), **rt.env, **extra_env}
    t0 = time.perf_counter()
    res = subprocess.run(
        _argv(env, rt, b, "delete"),
        cwd=b.path,
        env=environ,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=10,
        check=False,
    )
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{rt.binary} delete failed (rc={res.returncode}): {res.stderr[-2000:]!r}")
    task_pb2.DeleteResponse.FromString(res.stdout)  # what containerd decodes
    return elapsed, res.stderr.decode(errors="replace")


def shutdown(address: str, b: FakeBundle, pid: int, timeout: float = 10.0) -> None:
    """Shutdown RPC to a server with no tasks (both shims then exit), and wait until it is gone."""
    with contextlib.suppress(RpcError, OSError), RawClient(address.removeprefix("unix://")) as c:
        c.call("Shutdown", task_pb2.ShutdownRequest(id=b.task_id), empty_pb2.Empty)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            raise RuntimeError(f"shim server {pid} did not exit after Shutdown")
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@dataclass
class Cycle:
    start: StartTiming  # a new pod: the server is forked
    start_reuse: StartTiming  # a second container of that pod: a live shim serves it already
    delete: list[float]  # both containers' delete actions
    baseline: Memory | None


def cycle(env: Env, rt: Variant, task_id: str, memory: bool = True) -> Cycle:
    """start (new server) → its memory → start of a second container of the same pod (reuse)
    → Shutdown → delete of both containers, on fresh fake bundles."""
    a = make_bundle(env, task_id)
    b = make_bundle(env, task_id + "-c", sandbox=task_id)
    try:
        st = run_start(env, rt, a)
        pid = find_server(rt.basename, task_id)
        mem = None
        if memory:
            time.sleep(0.1)  # the server finishes setting up (loop, logging) after accepting
            mem = Memory.of(pid)
        reuse = run_start(env, rt, b)
        if reuse.address != st.address:
            raise RuntimeError(f"{rt.name}: the second container got {reuse.address}, not {st.address}")
        shutdown(st.address, a, pid)
        deletes = [run_delete(env, rt, b)[0], run_delete(env, rt, a)[0]]
        return Cycle(st, reuse, deletes, mem)
    finally:
        for bundle in (a, b):
            bundle.drain_log()
            bundle.remove()


_warmups = itertools.count()


def warm_actions_zygote(env: Env) -> None:
    """The actions' fake bundles have a state dir of their own, and so a zygote of their own
    (whose "containerd" is the bench): one podshim cycle spawns it, then wait until it serves."""
    cycle(env, Variant.of(RUNTIMES[PODSHIM]), f"zwarm-act-{next(_warmups)}", memory=False)
    wait_for_zygote(env.scratch / "actions")


def find_server(basename: str, task_id: str, timeout: float = 10.0) -> int:
    """The server a `start` left for `task_id`: its argv names the binary within the first three
    words (`python [-IS] …/binary …`) and has `-id <task_id>`, and it is no `delete`."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = [x.decode(errors="replace") for x in f.read().split(b"\0") if x]
            except OSError:
                continue
            if not any(os.path.basename(x) == basename for x in argv[:3]) or "delete" in argv:
                continue
            if "-id" in argv[:-1] and argv[argv.index("-id") + 1] == task_id and _alive(int(entry)):
                found.append(int(entry))
        if len(found) == 1:
            return found[0]
        if time.monotonic() > deadline:
            raise RuntimeError(f"expected one {basename} server for {task_id}, found {found}")
        time.sleep(0.02)


# -- -X importtime ---------------------------------------------------------------------------------


def parse_importtime(text: str) -> dict[str, tuple[int, int, int]]:
    """{module: (self µs, cumulative µs, nesting depth)} from `-X importtime` lines."""
    out: dict[str, tuple[int, int, int]] = {}
    for line in text.splitlines():
        m = IMPORT_LINE.match(line.strip("\n"))
        if m:
            out[m.group(4)] = (int(m.group(1)), int(m.group(2)), len(m.group(3)) // 2)
    return out


def group_of(module: str) -> str:
    top = module.split(".")[0]
    if module.startswith("podshim.api"):
        return "podshim.api (generated *_pb2)"
    if top == "podshim":
        return "podshim (our code)"
    if top == "google":
        return "protobuf (google.protobuf, upb)"
    if top in ("asyncio", "concurrent", "selectors", "ssl", "_ssl", "socket"):
        return "asyncio + socket/ssl"
    if top in ("logging", "traceback", "linecache", "string", "weakref", "threading"):
        return "logging (+ threading, traceback)"
    return "other stdlib"


def importtime_profile(
    env: Env, rt: Variant, reps: int, extra_env: Mapping[str, str] = {}
) -> dict[str, dict[str, tuple[int, int, int]]]:
    """`-X importtime` of the start action (before the fork), of the server after the fork (it
    writes to the log FIFO), and of the delete action; the median over `reps` runs per module."""
    runs: dict[str, list[dict[str, tuple[int, int, int]]]] = {"start": [], "server": [], "delete": []}
    environ = {**extra_env, "PYTHONPROFILEIMPORTTIME": "1"}
    for i in range(reps):
        b = make_bundle(env, f"imp-{rt.name}-{i}-{os.getpid()}")
        try:
            st = run_start(env, rt, b, environ, merge_stderr=False)
            pid = find_server(rt.basename, b.task_id)
            time.sleep(0.2)
            shutdown(st.address, b, pid)
            runs["start"].append(parse_importtime(st.stderr))
            runs["server"].append(parse_importtime(b.drain_log().decode(errors="replace")))
            _, err = run_delete(env, rt, b, environ)
            runs["delete"].append(parse_importtime(err))
        finally:
            b.drain_log()
            b.remove()
    return {phase: _median_profile(samples) for phase, samples in runs.items()}


def _median_profile(samples: list[dict[str, tuple[int, int, int]]]) -> dict[str, tuple[int, int, int]]:
    modules = {m for s in samples for m in s}
    out: dict[str, tuple[int, int, int]] = {}
    for m in modules:
        vals = [s.get(m, (0, 0, 0)) for s in samples]
        out[m] = (
            int(statistics.median(v[0] for v in vals)),
            int(statistics.median(v[1] for v in vals)),
            max(v[2] for v in vals),
        )
    return out


def pyc_copy(dest: Path) -> dict[str, str]:
    """A copy of the podshim package with compiled bytecode, and the environment that imports it.

    The editable install runs podshim from the source tree, and with PYTHONDONTWRITEBYTECODE set
    (as it is on these machines) no __pycache__ is ever written there, so every shim start
    compiles every podshim module again. The copy shows what a normal install (pip compiles the
    bytecode) would cost, without touching the work tree.
    """
    import compileall

    from bench import REPO

    env = {"PYTHONPATH": str(dest)}
    if (dest / ".done").exists():  # one copy per bench run, shared by the scenarios
        return env
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(REPO / "podshim", dest / "podshim", ignore=shutil.ignore_patterns("__pycache__"))
    if not compileall.compile_dir(str(dest / "podshim"), quiet=1):
        raise RuntimeError("compileall of the podshim copy failed")
    (dest / ".done").touch()
    return env
