"""Every thread's Python stack as text: the shim's and the guest agent's ``Stacks`` share it.
Standard library only (the guest runs it too)."""

from __future__ import annotations

import sys
import threading
import traceback


def thread_stacks() -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    blocks = []
    for ident, frame in sorted(sys._current_frames().items()):
        lines = "".join(traceback.format_stack(frame))
        blocks.append(f"thread {names.get(ident, '?')} ({ident}):\n{lines}")
    return "\n".join(blocks)
