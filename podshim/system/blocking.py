"""Blocking calls the shim cannot avoid (file system, mount tables), run on a worker thread.

The shim has one event loop.  A small file operation takes microseconds on a quiet node and
tens of milliseconds on a busy disk (an ext4 journal commit, an overlay unmount waiting for RCU
grace periods); on the loop, that stalls every request of the pod.  ``off_loop`` runs the call on
the loop's default executor.  A caller cancelled meanwhile (a deadline) still waits for the call
to finish before the cancellation goes on, so that its cleanup never races the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def off_loop(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    running = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        await asyncio.wait([running])
        raise
