"""The exec state machine and the task's event line, against fake processes (no sleeps: each
interleaving of Start, exits, Delete and deadlines is spelled out)."""

from __future__ import annotations

import asyncio

import pytest
from fakes import BOUND, make_task, until

import podshim.task
from podshim import errdefs
from podshim.process import LIVE, TRANSITIONS, ExecState, IllegalMove, Move
from podshim.system.stdio import StdioConfig
from podshim.task import Status

S = ExecState
SPEC = {"args": ["true"]}


async def bounded(aw):  # type: ignore[no-untyped-def]
    return await asyncio.wait_for(aw, BOUND)


# -- the table -----------------------------------------------------------------------------------


def test_every_state_has_a_row_and_every_target_is_a_state() -> None:
    assert set(TRANSITIONS) == set(ExecState)
    for row in TRANSITIONS.values():
        for targets in row.values():
            assert targets and targets <= set(ExecState)


async def test_a_move_the_table_lacks_is_refused() -> None:
    task, _, _ = make_task()
    with pytest.raises(IllegalMove):
        task.init.reported()  # CREATED has no REPORTED row
    assert task.init.state is S.CREATED


# -- Start and exits --------------------------------------------------------------------------------


async def test_start_then_exit_publishes_start_then_exit() -> None:
    task, c, events = make_task()
    assert await task.init.start() == 100
    assert task.init.state is S.RUNNING
    c.fake_init.exit(3)
    info = await bounded(task.init.wait())
    assert (info.pid, info.status) == (100, 3)
    assert events.topics == ["/tasks/start", "/tasks/exit"]


async def test_an_exit_during_start_is_recorded_at_once_and_published_after_the_start_event() -> None:
    task, c, events = make_task()
    c.fake_init.start_gate = asyncio.get_running_loop().create_future()
    starting = asyncio.ensure_future(task.init.start())
    await bounded(c.fake_init.starting.wait())
    c.fake_init.exit(7)
    assert task.init.state is S.STARTING_EXITED
    assert task.init.exit_status == 7  # recorded synchronously, not in a later task
    assert events.topics == []
    c.fake_init.start_gate.set_result(100)
    await bounded(starting)
    info = await bounded(task.init.wait())
    assert info.status == 7
    assert events.topics == ["/tasks/start", "/tasks/exit"]


async def test_a_deadline_during_start_leaves_no_stuck_exec() -> None:
    """The defect: CancelledError is no Exception, so Start stayed "starting" for ever, every
    later exit was parked and never published, and Wait never returned."""
    task, c, events = make_task()
    c.fake_init.start_gate = asyncio.get_running_loop().create_future()  # never set: a hung runc start
    c.fake_init.exit_on_kill = 137
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await task.init.start()
    # The failed start killed the half-started init; its exit is reported and Wait returns it.
    info = await bounded(task.init.wait())
    assert (info.status, c.fake_init.signals) == (137, [9])
    assert task.init.state is S.EXITED
    assert "/tasks/exit" in events.topics
    await bounded(task.delete(""))
    assert task.init.state is S.DELETED
    assert events.topics[-1] == "/tasks/delete"


async def test_an_exit_parked_by_a_start_that_then_fails_is_delivered() -> None:
    """The defect: a Start that failed dropped the exit that came while it ran."""
    task, c, events = make_task()
    c.fake_init.start_gate = asyncio.get_running_loop().create_future()
    c.fake_init.start_error = errdefs.ShimError("OCI runtime start failed")
    starting = asyncio.ensure_future(task.init.start())
    await bounded(c.fake_init.starting.wait())
    c.fake_init.exit(1)
    c.fake_init.start_gate.set_result(0)
    with pytest.raises(errdefs.ShimError):
        await bounded(starting)
    info = await bounded(task.init.wait())
    assert info.status == 1
    assert task.init.state is S.EXITED
    assert c.fake_init.signals == []  # it had exited: nothing to kill


async def test_a_cancelled_exec_start_with_a_parked_exit_delivers_it() -> None:
    task, c, events = make_task()
    await task.init.start()
    e = await task.create_exec("e1", SPEC, StdioConfig())
    p = c.execs["e1"]
    p.start_gate = asyncio.get_running_loop().create_future()
    starting = asyncio.ensure_future(e.start())
    await bounded(p.starting.wait())
    p.pid = 201  # the backend learned the pid, then the process died before Start returned
    p.exit(137)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert (await bounded(e.wait())).status == 137
    assert e.state is S.EXITED
    assert task.status_of(e) is Status.STOPPED


async def test_a_failed_exec_start_releases_wait_with_zero_and_stays_deletable() -> None:
    task, c, events = make_task()
    await task.init.start()
    e = await task.create_exec("e1", SPEC, StdioConfig())
    c.execs["e1"].start_error = errdefs.ShimError("exec: no such file")
    c.execs["e1"].start_pid = 0
    waiting = asyncio.ensure_future(e.wait())
    with pytest.raises(errdefs.ShimError):
        await e.start()
    info = await bounded(waiting)
    assert (info.status, info.exited_at) == (0, None)
    assert task.status_of(e) is Status.CREATED
    with pytest.raises(errdefs.FailedPrecondition):
        await e.kill(9)
    await bounded(task.delete("e1"))
    assert "e1" not in task.execs


async def test_wait_blocks_while_starting_and_running() -> None:
    task, c, _ = make_task()
    c.fake_init.start_gate = asyncio.get_running_loop().create_future()
    waiting = asyncio.ensure_future(task.init.wait())
    starting = asyncio.ensure_future(task.init.start())
    await bounded(c.fake_init.starting.wait())
    await asyncio.sleep(0)
    assert not waiting.done()
    c.fake_init.start_gate.set_result(100)
    await bounded(starting)
    assert not waiting.done()
    c.fake_init.exit(0)
    assert (await bounded(waiting)).status == 0


async def test_a_second_start_is_refused() -> None:
    task, _, _ = make_task()
    await task.init.start()
    with pytest.raises(errdefs.ShimError, match="cannot start a running process"):
        await task.init.start()


# -- Kill ----------------------------------------------------------------------------------------


async def test_kill_rules() -> None:
    task, c, _ = make_task()
    await task.init.start()
    e = await task.create_exec("e1", SPEC, StdioConfig())
    with pytest.raises(errdefs.FailedPrecondition, match="process not created"):
        await e.kill(9)  # pid 0
    await task.init.kill(15)
    assert c.fake_init.signals == [15]
    c.fake_init.exit(143)
    await bounded(task.init.wait())
    with pytest.raises(errdefs.NotFound, match="process already finished"):
        await task.init.kill(9)
    await task.kill("", 9, True)  # kill --all on a stopped container is fine
    await bounded(task.delete(""))
    with pytest.raises(errdefs.NotFound, match="deleted"):
        await task.init.kill(9)
    with pytest.raises(errdefs.NotFound, match="deleted"):
        await task.kill("", 9, True)


# -- Delete ----------------------------------------------------------------------------------------


async def test_two_concurrent_deletes_one_wins() -> None:
    """The defect: both passed the check before either had awaited, and both published."""
    task, c, events = make_task()
    await task.init.start()
    c.fake_init.exit(0)
    await bounded(task.init.wait())
    c.delete_gate = asyncio.get_running_loop().create_future()
    first = asyncio.ensure_future(task.delete(""))
    second = asyncio.ensure_future(task.delete(""))
    await until(lambda: second.done(), "the second Delete to be refused")
    with pytest.raises(errdefs.NotFound):
        second.result()
    c.delete_gate.set_result(None)
    await bounded(first)
    assert c.deleted == 1
    assert events.topics.count("/tasks/delete") == 1


async def test_delete_of_a_running_process_is_refused() -> None:
    task, _, _ = make_task()
    await task.init.start()
    with pytest.raises(errdefs.ShimError, match="cannot delete a running process"):
        await task.delete("")
    assert task.init.state is S.RUNNING


async def test_no_task_exit_after_task_delete_for_a_created_init() -> None:
    """The defect: Delete of a created container killed its init, whose TaskExit then came after
    TaskDelete.  Now the exit is recorded for the Delete reply and never published."""
    task, c, events = make_task()
    info = await bounded(task.delete(""))
    assert info.status == 137  # the exit its removal caused
    assert events.topics == ["/tasks/delete"]


async def test_delete_waits_for_an_exit_report_in_flight() -> None:
    """An init exit whose TaskExit waits for leftovers to be killed: a Delete that comes
    meanwhile (State already says stopped) must not publish TaskDelete first."""
    task, c, events = make_task(shares_pid_namespace=True)
    await task.init.start()
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    real_kill_all = c.kill_all

    async def slow_kill_all(sig: int) -> None:
        await gate
        await real_kill_all(sig)

    c.kill_all = slow_kill_all  # type: ignore[method-assign]
    c.fake_init.exit(0)
    assert task.status_of(task.init) is Status.STOPPED
    deleting = asyncio.ensure_future(task.delete(""))
    await asyncio.sleep(0)
    assert not deleting.done()
    gate.set_result(None)
    await bounded(deleting)
    assert events.topics[-2:] == ["/tasks/exit", "/tasks/delete"]
    assert c.kill_all_signals == [9]


async def test_a_cancelled_delete_can_be_retried() -> None:
    task, c, events = make_task()
    await task.init.start()
    c.fake_init.exit(0)
    await bounded(task.init.wait())
    c.delete_gate = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await task.delete("")
    assert task.init.state is S.EXITED
    c.delete_gate = None
    await bounded(task.delete(""))
    assert events.topics.count("/tasks/delete") == 1


# -- execs and their init ---------------------------------------------------------------------------


async def test_the_inits_exit_waits_for_its_execs_exits() -> None:
    """runc-v2's order: the execs' TaskExits, then the init's."""
    task, c, events = make_task()
    await task.init.start()
    e = await task.create_exec("e1", SPEC, StdioConfig())
    await e.start()
    c.fake_init.exit(0)
    await asyncio.sleep(0)
    assert "/tasks/exit c1" not in events.named()
    assert task.init.state is S.EXITING
    c.execs["e1"].exit(137)
    await bounded(task.init.wait())
    exits = [n for n in events.named() if n.startswith("/tasks/exit")]
    assert exits == ["/tasks/exit e1", "/tasks/exit c1"]


async def test_execs_still_running_at_init_delete_are_killed_and_released(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The defect: Delete released only execs that were not running: a running one kept its fds
    and later published TaskExit for a deleted task."""
    task, c, events = make_task(shares_pid_namespace=True)
    await task.init.start()
    e = await task.create_exec("e1", SPEC, StdioConfig())
    await e.start()
    p = c.execs["e1"]
    p.exit_on_kill = 137
    c.fake_init.exit(0)
    # kill_all of the fake kills nothing: the exec survives the init, as in a host pid namespace;
    # the init's TaskExit waits for it only so long.
    monkeypatch.setattr(podshim.task, "EXEC_EXITS_TIMEOUT", 0.01)
    await bounded(task.init.wait())
    assert e.state is S.RUNNING
    await bounded(task.delete(""))
    assert p.signals == [9]
    assert p.closed == 1
    assert e.state is S.DELETED
    assert events.topics[-1] == "/tasks/delete"
    assert events.named().index("/tasks/exit e1") < events.topics.index("/tasks/delete")


async def test_an_exec_that_exits_after_its_container_is_deleted_publishes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task, c, events = make_task(shares_pid_namespace=True)
    await task.init.start()
    e = await task.create_exec("e1", SPEC, StdioConfig())
    await e.start()
    # The exec ignores SIGKILL (a hung backend): the init's report and Delete give up on it after
    # their bound.
    monkeypatch.setattr(podshim.task, "EXEC_EXITS_TIMEOUT", 0.01)
    c.fake_init.exit(0)
    await bounded(task.init.wait())
    await bounded(task.delete(""))
    assert e.state is S.DELETED
    c.execs["e1"].exit(137)
    assert events.topics[-1] == "/tasks/delete"
    assert e.exit_status == 137


async def test_exec_ids_are_reserved_and_reusable_after_delete() -> None:
    task, _, _ = make_task()
    await task.init.start()
    e = await task.create_exec("e1", SPEC, StdioConfig())
    with pytest.raises(errdefs.AlreadyExists):
        await task.create_exec("e1", SPEC, StdioConfig())
    await bounded(task.delete("e1"))
    assert e.state is S.DELETED
    await task.create_exec("e1", SPEC, StdioConfig())


def test_live_states_are_the_ones_a_process_may_run_in() -> None:
    assert {S.STARTING, S.STARTING_EXITED, S.RUNNING} == LIVE
    assert Move.ABANDON in TRANSITIONS[S.RUNNING]
