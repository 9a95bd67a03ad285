"""containerd's identifier rules, checked where a client's id enters the shim.

Task ids, exec ids and grouping keys become file and directory names (bundle files, pid files,
runc state, VM run dirs that are later removed recursively), so each one is checked before any
use: ``[A-Za-z0-9]`` runs joined by single ``.``, ``_`` or ``-``, at most 76 characters — the
rule containerd applies to its own identifiers.  No ``/``, no ``..``, nothing empty.

Plain string checks, no ``re``: the ``start`` action runs this for every container, and loads
only what it needs.
"""

from __future__ import annotations

from podshim import errdefs

MAX_LENGTH = 76
SEPARATORS = frozenset("._-")
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
# The name the init process goes by (its pid file, containerd's and our logs); an exec may not take it.
RESERVED_EXEC_IDS = frozenset({"init"})


def problem(value: str) -> str:
    """Why ``value`` is not a valid identifier; "" if it is one."""
    if not value:
        return "must not be empty"
    if len(value) > MAX_LENGTH:
        return f"is {len(value)} characters long, more than {MAX_LENGTH}"
    prev_sep = True  # a leading separator counts as following one
    for ch in value:
        if ch in _ALNUM:
            prev_sep = False
        elif ch in SEPARATORS:
            if prev_sep:
                return "has a separator ('.', '_', '-') at its start or next to another"
            prev_sep = True
        else:
            return f"has the character {ch!r}; only A-Z, a-z, 0-9 and '.', '_', '-' are allowed"
    if prev_sep:
        return "ends with a separator ('.', '_', '-')"
    return ""


def _short(value: str) -> str:
    return value if len(value) <= 40 else value[:40] + "..."


def check(what: str, value: str) -> str:
    """``value`` if it is a valid identifier; else InvalidArgument naming ``what`` it is."""
    why = problem(value)
    if why:
        raise errdefs.InvalidArgument(f"{what} {_short(value)!r} is not a valid identifier: it {why}")
    return value


def check_task_id(value: str) -> str:
    return check("task id", value)


def check_exec_id(value: str) -> str:
    """An exec id of a request; "" (the init process) passes."""
    if not value:
        return value
    if value in RESERVED_EXEC_IDS:
        raise errdefs.InvalidArgument(f"exec id {value!r} is reserved for the container's init process")
    return check("exec id", value)
