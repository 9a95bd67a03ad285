"""The warm zygote and the C entry point (podshim/shim/zygote.py, podshim/shim/entry.c).

Each test starts containerds of its own, warm (the C entry point on PATH, as setup.sh installs it)
or cold (the Python entry point under the shim's name), so that it controls their zygotes' lives.
The lower-level tests run the entry point by hand on a fake bundle, with a zygote they spawn
themselves and a fake runc that records its parent: the process that ran the `delete` action is
the entry point itself when it ran cold, a zygote worker when it ran warm.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import leaks
from harness.containerd import (
    PODSHIM_BINARY,
    PODSHIM_COLD_DIR,
    VENV_BIN,
    PrivateContainerd,
    c_entry_point_built,
)
from harness.ctr import Ctr, cleanup_namespace
from harness.images import ImageTarball, import_image
from harness.poll import wait_until
from harness.runtimes import PODSHIM

from podshim.api import task_pb2
from podshim.shim import zygote

ENTRY = VENV_BIN / PODSHIM_BINARY


def _built() -> bool:
    try:
        return c_entry_point_built()
    except OSError:
        return False


pytestmark = pytest.mark.skipif(
    not _built(), reason="no C entry point (setup.sh had no gcc): every action runs cold, no zygote"
)

Containerds = Callable[[str], tuple[PrivateContainerd, Ctr]]


@pytest.fixture
def containerds(ctr: Ctr, busybox_image: ImageTarball) -> Iterator[Containerds]:
    """Private containerds in a given shim mode, each with a ctr namespace named after the
    session's (so that the leak guard sees their cgroups), busybox imported."""
    made: list[tuple[PrivateContainerd, Ctr]] = []

    def new(mode: str) -> tuple[PrivateContainerd, Ctr]:
        cd = PrivateContainerd(Path(tempfile.mkdtemp(prefix="podshim-zy-")), shim_mode=mode)
        c = Ctr(cd.address, f"{ctr.namespace}z{len(made)}", timeout=60.0)
        made.append((cd, c))
        cd.start()
        import_image(c, busybox_image)
        return cd, c

    yield new
    for cd, c in made:
        if cd.is_running():
            with contextlib.suppress(AssertionError):
                cleanup_namespace(c)
        cd.close()
        leaks.remove_empty_cgroups(leaks.namespace_cgroups(c.namespace, depth=0))


def _zygotes(cd: PrivateContainerd) -> list[leaks.Proc]:
    return [
        p
        for p in leaks.session_processes("no-such-prefix-")
        if p.kind == "zygote" and (a := leaks.zygote_argv(p)) is not None and a[0].startswith(f"{cd.state}/")
    ]


def _alive(proc: leaks.Proc) -> bool:
    try:
        raw = Path(f"/proc/{proc.pid}/stat").read_text()
    except OSError:
        return False
    rest = raw[raw.rfind(")") + 2 :].split()
    return rest[0] not in ("Z", "X") and int(rest[19]) == proc.start


def _stat(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rfind(")") + 2 :].split()  # [0] is field 3 of proc(5)


def forked_from_zygote(pid: int) -> bool:
    """A cold process's argv lies on its stack; a zygote's worker points the kernel at a copy on
    its heap (prctl PR_SET_MM), below the stack."""
    fields = _stat(pid)
    start_stack, arg_start = int(fields[25]), int(fields[45])
    return arg_start < start_stack


def server_pid(cid: str) -> int:
    own_ns = os.readlink("/proc/self/ns/mnt")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/mnt") != own_ns:
                continue  # another test session's
            args = Path(f"/proc/{entry}/cmdline").read_bytes().decode().split("\0")[:-1]
        except OSError:
            continue
        if (
            any(PODSHIM_BINARY in a for a in args[:2])
            and args[-1:] == ["start"]
            and f"-id\0{cid}\0" in ("\0".join(args) + "\0")
        ):
            return int(entry)
    raise AssertionError(f"no podshim server for {cid} among {_podshim_processes()}")


def _podshim_processes() -> list[str]:
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "podshim" in cmdline:
                out.append(f"{entry}: {cmdline}")
    return out


def _warm_server(c: Ctr, image: str, name: str, want_warm: bool, attempts: int = 10) -> tuple[str, int]:
    """Run a container detached until its server is (or is not) a zygote's; its id and server pid.
    The first start of a containerd spawns its zygote, and the ones before it is up run cold."""
    for i in range(attempts):
        cid = f"{name}{i}"
        c.check("run", "-d", "--runtime", PODSHIM, image, cid, "sleep", "600")
        pid = server_pid(cid)
        if forked_from_zygote(pid) == want_warm:
            return cid, pid
        c.check("task", "kill", "-s", "KILL", cid)
        wait_until(lambda cid=cid: c.task_status(cid) == "STOPPED", 30, f"{cid} stopped")
        c.check("task", "rm", cid)
        c.check("container", "rm", cid)
    raise AssertionError(f"no {'warm' if want_warm else 'cold'} server in {attempts} starts")


def _fds(pid: int, cd: PrivateContainerd, cid: str = "<id>") -> list[str]:
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}").replace(str(cd.base), "<base>").replace(cid, "<id>")
            # A shim's socket (and its lock file) is named by a hash of its pod: <sock>.
            target = re.sub(r"/s/[0-9a-f]{32,}", "/s/<sock>", target)
            out.append(f"{fd}:{re.sub(r'[0-9]+', 'N', target)}")
    return out


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(e.split("=", 1) for e in raw.split("\0") if "=" in e)


def _describe(pid: int, cid: str, cd: PrivateContainerd, namespace: str) -> dict[str, object]:
    assert cd.pid is not None
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    norm = {cd.address: "<address>", cid: "<id>", namespace: "<ns>"}
    env, containerd_env = _environ(pid), _environ(cd.pid)
    pgrep = subprocess.run(["pgrep", "-f", "containerd-shim-podshim"], capture_output=True, text=True).stdout
    fields = _stat(pid)
    return {
        "cmdline": [norm.get(a, a) for a in args],
        "env added to containerd's": sorted(k for k in env if env[k] != containerd_env.get(k)),
        "env lost from containerd's": sorted(k for k in containerd_env if k not in env),
        "oom_score_adj - containerd's": int(Path(f"/proc/{pid}/oom_score_adj").read_text())
        - int(Path(f"/proc/{cd.pid}/oom_score_adj").read_text()),
        "cgroup is containerd's": Path(f"/proc/{pid}/cgroup").read_text()
        == Path(f"/proc/{cd.pid}/cgroup").read_text(),
        "ppid": int(fields[1]),
        "session leader": int(fields[3]) == pid,
        "pgrep -f containerd-shim-podshim": str(pid) in pgrep.split(),
        "fds": _fds(pid, cd, cid),
    }


def test_forked_server_is_indistinguishable_from_a_cold_one(
    containerds: Containerds, busybox_image: ImageTarball
) -> None:
    seen: dict[str, dict[str, object]] = {}
    for mode in ("cold", "warm"):
        cd, c = containerds(mode)
        cid, pid = _warm_server(c, busybox_image.ref, f"ind-{mode}-", want_warm=mode == "warm")
        c.task_status(cid)  # one more round trip: the server's connections are all made
        wait_until(lambda p=pid, d=cd: any("eventpoll" in f for f in _fds(p, d)), 10, "the server's loop")
        seen[mode] = _describe(pid, cid, cd, c.namespace)
    assert seen["warm"] == seen["cold"]
    assert seen["warm"]["env added to containerd's"] == ["GOMAXPROCS", "TTRPC_ADDRESS"]
    assert seen["warm"]["oom_score_adj - containerd's"] == 1
    assert seen["warm"]["pgrep -f containerd-shim-podshim"] is True


def test_zygote_killed_mid_run_costs_only_speed(
    containerds: Containerds, busybox_image: ImageTarball
) -> None:
    cd, c = containerds("warm")
    c.check("run", "--rm", "--runtime", PODSHIM, busybox_image.ref, "first", "true")
    wait_until(lambda: _zygotes(cd), 30, "a zygote for the new containerd")
    first = _zygotes(cd)[0]
    results: list[tuple[int, str]] = []

    def runs() -> None:
        for i in range(6):
            r = c.run("run", "--rm", "--runtime", PODSHIM, busybox_image.ref, f"k{i}", "echo", f"hi{i}")
            results.append((r.rc, r.stdout))

    t = threading.Thread(target=runs)
    t.start()
    wait_until(lambda: results, 60, "the first run")
    os.kill(first.pid, signal.SIGKILL)
    t.join(timeout=180)
    assert not t.is_alive()
    assert results == [(0, f"hi{i}\n") for i in range(6)]
    # The next cold start spawned a successor, which serves again.
    wait_until(lambda: any(p.pid != first.pid for p in _zygotes(cd)), 30, "a new zygote")
    cid, _ = _warm_server(c, busybox_image.ref, "after-", want_warm=True)
    c.check("task", "kill", "-s", "KILL", cid)


def test_containerd_exit_takes_its_zygote(containerds: Containerds, busybox_image: ImageTarball) -> None:
    cd, c = containerds("warm")
    c.check("run", "--rm", "--runtime", PODSHIM, busybox_image.ref, "one", "true")
    wait_until(lambda: _zygotes(cd), 30, "a zygote")
    (z,) = _zygotes(cd)
    sock = leaks.zygote_argv(z)
    assert sock is not None and sock[1] == cd.pid
    cd.stop()
    wait_until(lambda: not _alive(z), 15, "the zygote to exit with its containerd")
    assert not os.path.exists(sock[0])


def test_two_containerds_get_two_zygotes(containerds: Containerds, busybox_image: ImageTarball) -> None:
    pairs = [containerds("warm") for _ in range(2)]
    for i, (_cd, c) in enumerate(pairs):
        c.check("run", "--rm", "--runtime", PODSHIM, busybox_image.ref, f"two{i}", "true")
    for cd, _c in pairs:
        wait_until(lambda cd=cd: len(_zygotes(cd)) == 1, 30, f"one zygote for {cd.base}")
    (z1,), (z2,) = (_zygotes(cd) for cd, _c in pairs)
    a1, a2 = leaks.zygote_argv(z1), leaks.zygote_argv(z2)
    assert a1 is not None and a2 is not None
    assert z1.pid != z2.pid and a1[0] != a2[0]
    assert (a1[1], a2[1]) == (pairs[0][0].pid, pairs[1][0].pid)
    for (cd, _c), a in zip(pairs, (a1, a2), strict=True):
        assert a[0].startswith(f"{cd.state}/s/zygote-")


# -- the entry point by hand, on a fake bundle ---------------------------------------------------


class FakeBundle:
    """<tmp>/state/io.containerd.runtime.v2.task/ns/c1 with an options.json whose runc records its
    parent, and a runc state dir, so that `delete` runs it."""

    def __init__(self, tmp: Path) -> None:
        self.state = tmp / "state"
        self.path = self.state / "io.containerd.runtime.v2.task" / "ns" / "c1"
        self.path.mkdir(parents=True)
        (tmp / "runc-root" / "ns" / "c1").mkdir(parents=True)
        self.parents = tmp / "runc-parents"
        runc = tmp / "fake-runc"
        runc.write_text(f"#!/bin/sh\necho $PPID >> {self.parents}\n")
        runc.chmod(0o755)
        options = {"binary_name": str(runc), "root": str(tmp / "runc-root")}
        (self.path / "options.json").write_text(json.dumps(options))

    def delete(self, *prefix: str) -> tuple[bool, task_pb2.DeleteResponse]:
        """Run the delete action through the entry point; (whether a zygote ran it, its reply)."""
        self.parents.unlink(missing_ok=True)
        argv = [*prefix, str(ENTRY), "-namespace", "ns", "-address", "/fake/c.sock", "-id", "c1"]
        proc = subprocess.Popen(
            [*argv, "-bundle", str(self.path), "delete"],
            cwd=self.path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert err == b""
        return int(self.parents.read_text()) != proc.pid, task_pb2.DeleteResponse.FromString(out)


@contextlib.contextmanager
def own_zygote(bundle: Path, key: str, idle: float = 120.0) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A zygote for a fake containerd (a `sleep`), spawned as the cold start would."""
    path = zygote.socket_path(str(bundle), key)
    assert path is not None
    keeper = subprocess.Popen(["sleep", "600"])
    start = Path(f"/proc/{keeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    argv = [str(VENV_BIN / "python"), "-P", "-m", "podshim.shim.zygote", path, f"{keeper.pid}:{start}",
            str(PODSHIM_COLD_DIR / PODSHIM_BINARY), str(idle)]  # fmt: skip
    z = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        yield z, path
    finally:
        keeper.kill()
        keeper.wait()
        with contextlib.suppress(subprocess.TimeoutExpired):
            z.wait(timeout=10)
        if z.poll() is None:
            z.kill()
            z.wait()


@pytest.mark.parametrize("unshare", ["--mount", "--net", "--uts"])
def test_caller_in_another_namespace_runs_cold(tmp_path: Path, unshare: str) -> None:
    bundle = FakeBundle(tmp_path)
    with own_zygote(bundle.path, zygote.key_of(str(ENTRY))):
        # Warm first, so that the refusal below is the zygote's and not its absence.
        replies: list[task_pb2.DeleteResponse] = []
        wait_until(lambda: _warm_into(bundle.delete(), replies), 30, "a delete run by the zygote")
        # Several times: a zygote without the check would serve most of these (it just served one).
        for _ in range(3):
            cold, reply = bundle.delete("unshare", unshare, "--")
            assert not cold, f"a caller in another {unshare[2:]} namespace was served by the zygote"
            replies.append(reply)
        assert [r.exit_status for r in replies] == [137] * 4


def _warm_into(result: tuple[bool, task_pb2.DeleteResponse], replies: list[task_pb2.DeleteResponse]) -> bool:
    if result[0]:
        replies.append(result[1])
    return result[0]


def test_new_version_retires_the_old_zygote_and_idle_ends_it(tmp_path: Path) -> None:
    bundle = FakeBundle(tmp_path)
    with own_zygote(bundle.path, "1-1") as (old, old_path):
        wait_until(lambda: os.path.exists(old_path), 30, "the old zygote's socket")
        with own_zygote(bundle.path, "2-2", idle=3.0) as (new, new_path):
            wait_until(lambda: old.poll() is not None, 30, "the old version's zygote to exit")
            assert not os.path.exists(old_path)
            wait_until(lambda: new.poll() is not None, 30, "the idle zygote to exit")
            assert not os.path.exists(new_path)


def test_a_zygote_that_never_answers_costs_only_speed(tmp_path: Path) -> None:
    """A socket at the zygote's path that never accepts (a zygote still loading, or wedged): the
    action runs cold, and nothing it was handed stays in flight holding containerd's pipe open
    (communicate() waits for EOF on stdout and stderr)."""
    bundle = FakeBundle(tmp_path)
    path = zygote.socket_path(str(bundle.path), zygote.key_of(str(ENTRY)))
    assert path is not None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as wedged:
        wedged.bind(path)
        wedged.listen(8)
        for _ in range(2):
            warm, reply = bundle.delete()
            assert not warm and reply.exit_status == 137
