"""Races a client can cause, through a real shim and runc, observed as containerd sees them:
two Deletes of one task at once, and the events of a task whose init dies at once with execs
running in it."""

from __future__ import annotations

import threading
from pathlib import Path

from harness.containerd import PrivateContainerd
from harness.ctr import Ctr
from test_deadlines import RawClient, _any, first_task, second_bundle
from test_robustness import finish

from podshim.api import task_pb2
from podshim.errdefs import Code

T = task_pb2


def test_two_concurrent_deletes_one_wins_and_one_task_delete(
    containerd: PrivateContainerd, ctr: Ctr, tmp_path: Path
) -> None:
    first, base, path = first_task(containerd, ctr)
    a, b = RawClient(path), RawClient(path)
    with ctr.events() as events:
        try:
            for i in range(5):
                tid = f"twice{i}"
                bdir = second_bundle(base, first / "rootfs", tmp_path / tid, tid)
                a.ok("Create", T.CreateTaskRequest(id=tid, bundle=str(bdir)))
                a.ok("Start", T.StartRequest(id=tid))
                a.ok("Kill", T.KillRequest(id=tid, signal=9))
                a.ok("Wait", T.WaitRequest(id=tid))
                codes: list[int] = []
                threads = [threading.Thread(target=_delete, args=(c, tid, codes)) for c in (a, b)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(30)
                assert sorted(codes) == [Code.OK, Code.NOT_FOUND], codes
            events.wait_for(lambda e: e.topic == "/tasks/delete" and e.container_id == "twice4", timeout=10)
            events.wait_quiet()
        finally:
            a.close()
            b.close()
        for i in range(5):
            mine = [e.topic for e in events.snapshot() if e.container_id == f"twice{i}"]
            assert mine.count("/tasks/delete") == 1, mine
            assert mine.index("/tasks/exit") < mine.index("/tasks/delete"), mine
    finish(ctr, "first")


def _delete(c: RawClient, tid: str, codes: list[int]) -> None:
    codes.append(c.call("Delete", T.DeleteRequest(id=tid))[0])


def test_an_inits_exit_comes_after_its_execs_exits(containerd: PrivateContainerd, ctr: Ctr) -> None:
    """runc-v2's order, which containerd's CRI relies on: when the init dies and its pid namespace
    takes the execs with it, their TaskExits go out before the init's."""
    _, base, path = first_task(containerd, ctr)
    c = RawClient(path)
    spec = _any({"args": ["sleep", "600"], "cwd": "/", "env": base["process"]["env"]})
    with ctr.events() as events:
        try:
            for i in range(3):
                c.ok("Exec", T.ExecProcessRequest(id="first", exec_id=f"x{i}", spec=spec))
                c.ok("Start", T.StartRequest(id="first", exec_id=f"x{i}"))
            c.ok("Kill", T.KillRequest(id="first", signal=9))
            c.ok("Wait", T.WaitRequest(id="first"))
            events.wait_for(lambda e: e.topic == "/tasks/exit" and e.subject == "first", timeout=10)
            events.wait_quiet()
            exits = [e.subject for e in events.snapshot() if e.topic == "/tasks/exit"]
            assert sorted(exits[:3]) == ["x0", "x1", "x2"] and exits[3:] == ["first"], exits
            for i in range(3):
                c.ok("Delete", T.DeleteRequest(id="first", exec_id=f"x{i}"))
        finally:
            c.close()
    finish(ctr, "first")
