"""Deadlines that expire while the shim is inside Create or Start (containerd passes its
context's deadline as the ttrpc request's timeout, and the shim cancels the handler).

Straight to a real shim's socket, with a sweep of deadlines from 1 ms (cancelled at the first
wait: runc create or start in flight) to 400 ms (usually done).  Whatever each attempt hit, the
task must not be stuck: Wait returns, Delete cleans up, and nothing of a cancelled Create is
left (runc state, cgroup, processes; the e2e guard checks the rest).
"""

from __future__ import annotations

import collections
import copy
import json
import socket
import time
from pathlib import Path
from typing import Any

from google.protobuf.message import Message
from harness.containerd import PrivateContainerd
from harness.ctr import Ctr
from harness.runtimes import PODSHIM
from test_robustness import bundle, finish, run_detached, shim_socket

from podshim.api import task_pb2, ttrpc_pb2
from podshim.errdefs import Code
from podshim.ttrpc.codec import HEADER, MSG_REQUEST, encode_frame

TASK = "containerd.task.v2.Task"
DEADLINES = [0.001, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4]
REPLY_BOUND = 30.0  # a reply that does not come in this long is a stuck handler
T = task_pb2


class RawClient:
    """One request at a time, with any ttrpc timeout, waiting for the shim's own answer."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(REPLY_BOUND)
        self.sock.connect(path)
        self.stream = 1

    def call(self, method: str, req: Message, timeout: float = 0.0) -> tuple[int, bytes]:
        sid, self.stream = self.stream, self.stream + 2
        body = ttrpc_pb2.Request(service=TASK, method=method, payload=req.SerializeToString(),
                                 timeout_nano=int(timeout * 1e9)).SerializeToString()  # fmt: skip
        self.sock.sendall(encode_frame(sid, MSG_REQUEST, body))
        length, got_sid, _, _ = HEADER.unpack(self._exact(HEADER.size))
        resp = ttrpc_pb2.Response.FromString(self._exact(length))
        assert got_sid == sid
        return resp.status.code, resp.payload

    def ok(self, method: str, req: Message) -> bytes:
        code, payload = self.call(method, req)
        assert code == Code.OK, f"{method}: code {code}"
        return payload

    def _exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            assert chunk, "the shim closed the connection"
            out += chunk
        return bytes(out)

    def close(self) -> None:
        self.sock.close()


def second_bundle(base: dict[str, Any], rootfs: Path, where: Path, tid: str) -> Path:
    """A bundle for one more task in the same shim, on the first one's (read-only) rootfs."""
    spec = copy.deepcopy(base)
    spec["root"] = {"path": str(rootfs), "readonly": True}
    spec["process"]["args"] = ["sleep", "600"]
    spec["process"]["terminal"] = False
    cg = spec["linux"]["cgroupsPath"]
    spec["linux"]["cgroupsPath"] = cg.rsplit("/", 1)[0] + "/" + tid
    where.mkdir()
    (where / "config.json").write_text(json.dumps(spec))
    return where


def first_task(cd: PrivateContainerd, ctr: Ctr) -> tuple[Path, dict[str, Any], str]:
    """Run task "first" (a standalone shim): its bundle, its spec, its shim's socket."""
    run_detached(ctr, PODSHIM, "first", "sleep", "600")
    first = bundle(cd, ctr, "first")
    return first, json.loads((first / "config.json").read_text()), shim_socket(cd, ctr, "first")


def runc_state(ctr: Ctr, tid: str) -> Path:
    return Path("/run/containerd/runc") / ctr.namespace / tid


def cgroup_procs(cgroups_path: str) -> list[int]:
    out: list[int] = []
    for base in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup/memory", "/sys/fs/cgroup"):
        procs = Path(base + cgroups_path) / "cgroup.procs"
        if procs.exists():
            out += [int(p) for p in procs.read_text().split()]
    return out


def assert_nothing_left(ctr: Ctr, tid: str, cgroups_path: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        left = []
        if runc_state(ctr, tid).exists():
            left.append(f"runc state {runc_state(ctr, tid)}")
        if procs := cgroup_procs(cgroups_path):
            left.append(f"processes {procs} in {cgroups_path}")
        if not left:
            return
        assert time.monotonic() < deadline, f"left behind by {tid}: {left}"
        time.sleep(0.05)


def test_deadlines_during_create_and_start_leave_nothing_stuck(
    containerd: PrivateContainerd, ctr: Ctr, tmp_path: Path
) -> None:
    first, base, path = first_task(containerd, ctr)
    c = RawClient(path)
    outcomes: dict[str, collections.Counter[str]] = {k: collections.Counter() for k in ("create", "start")}
    try:
        for i, d in enumerate(DEADLINES):
            tid = f"dl{i}"
            b = second_bundle(base, first / "rootfs", tmp_path / tid, tid)
            cg = json.loads((b / "config.json").read_text())["linux"]["cgroupsPath"]
            create = T.CreateTaskRequest(id=tid, bundle=str(b))
            code, _ = c.call("Create", create, timeout=d)
            outcomes["create"][Code(code).name] += 1
            if code != Code.OK:
                assert code in (Code.DEADLINE_EXCEEDED, Code.CANCELLED), code
                # No half-made task: the id is free and nothing of it is left.
                assert c.call("State", T.StateRequest(id=tid))[0] == Code.NOT_FOUND
                assert_nothing_left(ctr, tid, cg)
                c.ok("Create", create)
            code, _ = c.call("Start", T.StartRequest(id=tid), timeout=d)
            outcomes["start"][Code(code).name] += 1
            # Not stuck, whatever the Start hit: Kill, Wait and Delete all answer.
            kill_code, _ = c.call("Kill", T.KillRequest(id=tid, signal=9))
            assert kill_code in (Code.OK, Code.NOT_FOUND), kill_code
            waited = T.WaitResponse.FromString(c.ok("Wait", T.WaitRequest(id=tid)))
            assert waited.exit_status == 137
            state = T.StateResponse.FromString(c.ok("State", T.StateRequest(id=tid)))
            assert state.status == 3  # STOPPED
            c.ok("Delete", T.DeleteRequest(id=tid))
            assert_nothing_left(ctr, tid, cg)

            # An exec whose Start hits the deadline: the same, for an exec.
            spec = {"args": ["sleep", "600"], "cwd": "/", "env": base["process"]["env"]}
            c.ok("Exec", T.ExecProcessRequest(id="first", exec_id=f"x{i}", spec=_any(spec)))
            code, _ = c.call("Start", T.StartRequest(id="first", exec_id=f"x{i}"), timeout=d)
            outcomes["start"][f"exec {Code(code).name}"] += 1
            kill_code, _ = c.call("Kill", T.KillRequest(id="first", exec_id=f"x{i}", signal=9))
            assert kill_code in (Code.OK, Code.NOT_FOUND, Code.FAILED_PRECONDITION), kill_code
            c.ok("Wait", T.WaitRequest(id="first", exec_id=f"x{i}"))
            c.ok("Delete", T.DeleteRequest(id="first", exec_id=f"x{i}"))
            pids = T.PidsResponse.FromString(c.ok("Pids", T.PidsRequest(id="first")))
            assert len(pids.processes) == 1, f"an exec outlived its cancelled start: {describe(pids)}"
    finally:
        c.close()
    print("deadline outcomes:", outcomes)
    # The sweep did hit the handlers mid-way (1 ms cannot be enough for runc).
    assert outcomes["create"]["DEADLINE_EXCEEDED"] >= 1, outcomes
    assert outcomes["start"]["DEADLINE_EXCEEDED"] >= 1, outcomes
    assert outcomes["start"]["exec DEADLINE_EXCEEDED"] >= 1, outcomes
    finish(ctr, "first")


def describe(pids: T.PidsResponse) -> list[str]:
    out = []
    for p in pids.processes:
        try:
            cmd = Path(f"/proc/{p.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            out.append(f"{p.pid} (parent {stat[1]}, state {stat[0]}): {cmd}")
        except OSError:
            out.append(f"{p.pid} (gone)")
    return out


def _any(spec: dict[str, Any]) -> Any:
    from google.protobuf import any_pb2

    return any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                       value=json.dumps(spec).encode())  # fmt: skip

