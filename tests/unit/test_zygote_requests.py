"""The zygote's pieces that need no containerd (podshim/shim/zygote.py): the request a worker
receives, from the attacker's side (garbage, too little or too much gets a refusal, never an
action), the command line and environment the kernel shows for a worker, and the cgroup dirs
it would move into. tests/e2e/test_zygote.py runs the whole thing."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from podshim.shim import zygote

ARGV = ["containerd-shim-podshim-v1", "-namespace", "ns", "-id", "c1", "delete"]
ENV = ["PATH=/usr/bin", "TTRPC_ADDRESS=/run/c.sock.ttrpc", "ODD=a=b"]


def _request(argv: list[str] = ARGV, env: list[str] = ENV, magic: int = zygote.MAGIC) -> bytes:
    strings = b"".join(s.encode() + b"\0" for s in [*argv, *env])
    return zygote.HEADER.pack(magic, 0o027, len(argv), len(env)) + strings


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a, b


@pytest.fixture
def cwd_fd() -> Iterator[int]:
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def _send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    sock.sendmsg([data], anc)


def test_a_well_formed_request(pair: tuple[socket.socket, socket.socket], cwd_fd: int) -> None:
    _send(pair[0], _request(), [0, 1, 2, cwd_fd])
    req = zygote._receive(pair[1])
    assert req is not None
    assert (req.peer, req.umask, req.argv, req.env) == (os.getpid(), 0o027, ARGV, ENV)
    assert len(req.fds) == 4
    assert os.path.samestat(os.fstat(req.fds[3]), os.fstat(cwd_fd))
    for fd in req.fds:
        os.close(fd)


MALFORMED: dict[str, Callable[[int], tuple[bytes, list[int]]]] = {
    "wrong magic": lambda cwd: (_request(magic=0xDEADBEEF), [0, 1, 2, cwd]),
    "no fds": lambda cwd: (_request(), []),
    "three fds": lambda cwd: (_request(), [0, 1, 2]),
    "five fds": lambda cwd: (_request(), [0, 1, 2, cwd, cwd]),
    "short header": lambda cwd: (_request()[:10], [0, 1, 2, cwd]),
    "more strings than counted": lambda cwd: (_request() + b"EXTRA=1\0", [0, 1, 2, cwd]),
    "fewer strings than counted": lambda cwd: (_request()[: -len(b"ODD=a=b\0")], [0, 1, 2, cwd]),
    "no final NUL": lambda cwd: (_request()[:-1], [0, 1, 2, cwd]),
    "no argv": lambda cwd: (_request(argv=[]), [0, 1, 2, cwd]),
    "too big": lambda cwd: (_request(env=["X=" + "y" * zygote.MAX_REQUEST]), [0, 1, 2, cwd]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_request_is_refused(
    case: str, pair: tuple[socket.socket, socket.socket], cwd_fd: int
) -> None:
    pair[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * zygote.MAX_REQUEST)
    data, fds = MALFORMED[case](cwd_fd)
    _send(pair[0], data, fds)
    assert zygote._receive(pair[1]) is None


def test_a_worker_shows_the_callers_command_line_and_environment() -> None:
    argv = ["/venv/bin/python", "/venv/bin/podshim-cold/containerd-shim-podshim-v1", "-id", "c1", "start"]
    code = (
        "import sys\n"
        "from podshim.shim import zygote\n"
        f"zygote._set_proc_strings({argv!r}, {ENV!r})\n"
        "for name in ('cmdline', 'environ'):\n"
        "    sys.stdout.buffer.write(open(f'/proc/self/{name}', 'rb').read() + b'|')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    cmdline, environ, _ = out.split(b"|")
    assert cmdline.split(b"\0")[:-1] == [a.encode() for a in argv]
    assert environ.split(b"\0")[:-1] == [e.encode() for e in ENV]


def test_the_cgroup_dir_of_each_of_our_cgroups() -> None:
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    if not any(os.path.ismount(p) for p in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")):
        pytest.skip("no cgroup filesystem mounted here")
    found = 0
    for line in lines:
        _, controllers, path = line.split(":", 2)
        try:
            d = zygote._cgroup_mount(controllers, path)
        except OSError:
            continue  # a hierarchy this mount namespace does not mount (the worker then refuses)
        with open(os.path.join(d, "cgroup.procs")) as f:
            assert str(os.getpid()) in f.read().split(), (line, d)
        found += 1
    assert found
