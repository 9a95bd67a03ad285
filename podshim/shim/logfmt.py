"""The shim's log: logfmt lines, as runc-v2's logrus text formatter writes them, to containerd's
``log`` FIFO, and a copy of the last lines in memory for ``podshim logs`` (Diag.Logs).

Fields: ``time level msg runtime pod`` on every line, then ``id exec method duration`` where the
call site passes them (``log.info("...", extra={"id": cid})``).  A full FIFO never blocks the
shim: the line is dropped from the FIFO (it stays in memory).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import time

RUNTIME = "io.containerd.podshim.v1"
KEEP_LINES = 1000
OPTIONAL_FIELDS = ("id", "exec", "method", "duration")
_LEVELS = {"WARNING": "warning", "CRITICAL": "fatal"}
# Other control characters (a terminal escape from a hostile guest's console, say) as \xNN, so a
# line can neither forge another line nor drive the terminal of whoever reads the log.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"})


def quote(value: str) -> str:
    """logrus's rule: bare when it is plain, else a Go-style double-quoted string."""
    if value and all(c.isalnum() or c in "-._/@^+" for c in value):
        return value
    return f'"{_CONTROL.sub(_hex, value.translate(_ESCAPES))}"'


def _hex(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text: str) -> str:
    """Multi-line text from an untrusted source (a VM guest) made safe for a terminal: lines and
    tabs stay, every other control character becomes an escape."""
    return _CONTROL.sub(_hex, text.replace("\r", "\\r"))


def rfc3339(t: float) -> str:
    secs = int(t)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{int((t - secs) * 1e9):09d}Z"


def parse(line: str) -> dict[str, str]:
    """One logfmt line back into its fields."""
    out: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        eq = line.find("=", i)
        if eq < 0:
            break
        key = line[i:eq]
        i = eq + 1
        if i < n and line[i] == '"':
            i += 1
            chars: list[str] = []
            while i < n and line[i] != '"':
                if line[i] == "\\" and i + 1 < n:
                    i += 1
                    width = {"x": 2, "u": 4}.get(line[i], 0)
                    if width and i + width < n:
                        chars.append(chr(int(line[i + 1 : i + 1 + width], 16)))
                        i += width + 1
                        continue
                    chars.append({"n": "\n", "t": "\t", "r": "\r"}.get(line[i], line[i]))
                else:
                    chars.append(line[i])
                i += 1
            i += 1
            out[key] = "".join(chars)
        else:
            end = line.find(" ", i)
            end = n if end < 0 else end
            out[key] = line[i:end]
            i = end
    return out


class LogfmtHandler(logging.Handler):
    """Formats once, writes to ``fd`` (the log FIFO) and keeps the line in a ring."""

    def __init__(self, fd: int, pod: str, keep: int = KEEP_LINES) -> None:
        super().__init__()
        self.fd = fd
        self.pod = pod
        self.lines: collections.deque[tuple[int, str]] = collections.deque(maxlen=keep)
        self.seq = 0

    def render(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + logging.Formatter().formatException(record.exc_info)
        level = _LEVELS.get(record.levelname, record.levelname.lower())
        parts = [f"time={quote(rfc3339(record.created))}", f"level={level}", f"msg={quote(msg)}",
                 f"runtime={RUNTIME}"]  # fmt: skip
        if self.pod:
            parts.append(f"pod={quote(self.pod)}")
        fields = record.__dict__
        for key in OPTIONAL_FIELDS:
            value = fields.get(key)
            if value is not None and value != "":
                parts.append(f"{key}={quote(str(value))}")
        return " ".join(parts)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.render(record)
        except Exception:
            return
        self.seq += 1
        self.lines.append((self.seq, line))
        if self.fd >= 0:
            # A full or closed FIFO: the lesser harm is a lost line.
            with contextlib.suppress(OSError):
                os.write(self.fd, (line + "\n").encode(errors="replace"))

    def since(self, after: int) -> tuple[list[tuple[int, str]], int]:
        """Lines after sequence number ``after``, and how many of those fell out of the ring."""
        lines = [(s, text) for s, text in self.lines if s > after]
        first = lines[0][0] if lines else self.seq + 1
        return lines, max(0, first - after - 1)


HANDLER: LogfmtHandler | None = None


def fatal_line(msg: str) -> str:
    """A last line for a dying shim, written without the logging machinery."""
    pod = f" pod={quote(HANDLER.pod)}" if HANDLER is not None and HANDLER.pod else ""
    return f"time={quote(rfc3339(time.time()))} level=fatal msg={quote(msg)} runtime={RUNTIME}{pod}\n"


def install(fd: int, pod: str, debug: bool) -> LogfmtHandler:
    global HANDLER
    handler = LogfmtHandler(fd, pod)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    HANDLER = handler
    return handler
