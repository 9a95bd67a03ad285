"""The shim's stacks: every thread's and every asyncio task's, for Diag.Stacks and SIGUSR1."""

from __future__ import annotations

import asyncio
import io

from podshim.guest.stacks import thread_stacks


def task_stacks() -> str:
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:  # no running loop
        return ""
    blocks = []
    for task in sorted(tasks, key=lambda t: t.get_name()):
        out = io.StringIO()
        task.print_stack(file=out)
        blocks.append(f"asyncio task {task.get_name()} {task.get_coro()!r}:\n{out.getvalue()}")
    return "\n".join(blocks)


def dump() -> str:
    return f"{thread_stacks()}\n{task_stacks()}"
