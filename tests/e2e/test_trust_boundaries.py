"""Trust boundaries through containerd and the Task API, from the attacker's side: a client that
asks for host access without the admin's options, options that are broken, and ids that would
become paths outside the bundle or collide with the init's files.  Each case is refused with
InvalidArgument and leaves nothing behind (the e2e guard checks processes, mounts, sockets,
bundles and cgroups; the tests check the bundle's files themselves)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from google.protobuf.empty_pb2 import Empty
from harness.containerd import PrivateContainerd
from harness.ctr import Ctr
from harness.runtimes import PODSHIM

from podshim import errdefs
from podshim.api import task_pb2
from podshim.cli.install import host_handler
from podshim.ttrpc.client import Client

IMAGE = "docker.io/library/busybox:latest"
TASK = "containerd.task.v2.Task"
PROCESS_SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
BAD_IDS = ("../x", "x" * 300, "a/b", "-x", "x.")


def run_podshim(ctr: Ctr, *args: str, options: Path | None = None) -> tuple[int, str, str]:
    opts = ["--runtime-config-path", str(options)] if options is not None else []
    res = ctr.run("run", "--rm", "--runtime", PODSHIM, *opts, *args, timeout=60)
    return res.rc, res.stdout, res.stderr


def refused(rc: int, err: str, *fragments: str) -> None:
    assert rc != 0, "accepted"
    assert "invalid argument" in err.lower(), err
    for f in fragments:
        assert f in err, err


# -- isolation: only the admin's options grant host -----------------------------------------------


def test_standalone_host_task_needs_the_admins_options(ctr: Ctr, tmp_path: Path) -> None:
    rc, _, err = run_podshim(ctr, "--annotation", "podshim.io/isolation=host", IMAGE, "h1", "true")
    refused(rc, err, "'podshim.io/isolation: host' is not allowed", "allowed_isolation")
    ctr.run("container", "rm", "h1")

    # The same container with the options an admin gives the podshim-host handler: a host process.
    host = tmp_path / "podshim-host.toml"
    host.write_text(host_handler().options)
    rc, out, err = run_podshim(ctr, IMAGE, "h2", "readlink", "/proc/self/ns/pid", options=host)
    assert rc == 0, err
    assert out.strip() == os.readlink("/proc/self/ns/pid"), "not a host process"


# -- options fail closed ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "(ConfigPath) cannot be read"),
        ('isolaton = "process"\n', "unknown key 'isolaton'"),
        ("[vm]\nmemory = 512\n", "unknown key 'vm.memory'"),
        ("isolation = 1\n", "key 'isolation' must be a string"),
        ("isolation = \n", "is not valid TOML"),
    ],
    ids=["missing", "unknown-key", "unknown-vm-key", "wrong-type", "not-toml"],
)
def test_bad_handler_options_fail_closed(ctr: Ctr, tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "podshim.toml"
    if content is not None:
        path.write_text(content)
    rc, _, err = run_podshim(ctr, IMAGE, "o1", "true", options=path)
    refused(rc, err, message, str(path))
    ctr.run("container", "rm", "o1")


# -- ids -------------------------------------------------------------------------------------------


def bundle_of(cd: PrivateContainerd, ctr: Ctr, cid: str) -> Path:
    return cd.state / "io.containerd.runtime.v2.task" / ctr.namespace / cid


def listing(*dirs: Path) -> list[list[str]]:
    return [sorted(os.listdir(d)) for d in dirs]


async def _refuse_bad_exec_ids(sock: str, cid: str) -> None:
    spec = json.dumps({"args": ["true"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}})
    client = await Client.connect(sock)
    try:
        for eid in ("init", *BAD_IDS):
            req = task_pb2.ExecProcessRequest(id=cid, exec_id=eid)
            req.spec.type_url = PROCESS_SPEC_URL
            req.spec.value = spec.encode()
            with pytest.raises(errdefs.InvalidArgument, match="exec id"):
                await client.call(TASK, "Exec", req, Empty)
            for method, msg, resp in (
                ("Start", task_pb2.StartRequest(id=cid, exec_id=eid), task_pb2.StartResponse),
                ("State", task_pb2.StateRequest(id=cid, exec_id=eid), task_pb2.StateResponse),
                ("Kill", task_pb2.KillRequest(id=cid, exec_id=eid, signal=9), Empty),
                ("Delete", task_pb2.DeleteRequest(id=cid, exec_id=eid), task_pb2.DeleteResponse),
            ):
                with pytest.raises(errdefs.InvalidArgument, match="exec id"):
                    await client.call(TASK, method, msg, resp)
        for tid in BAD_IDS:
            create = task_pb2.CreateTaskRequest(id=tid, bundle="/")
            with pytest.raises(errdefs.InvalidArgument, match="task id"):
                await client.call(TASK, "Create", create, task_pb2.CreateTaskResponse)
            with pytest.raises(errdefs.InvalidArgument, match="task id"):
                await client.call(TASK, "State", task_pb2.StateRequest(id=tid), task_pb2.StateResponse)
            with pytest.raises(errdefs.InvalidArgument, match="task id"):
                await client.call(TASK, "Kill", task_pb2.KillRequest(id=tid, signal=9), Empty)
            with pytest.raises(errdefs.InvalidArgument, match="task id"):
                await client.call(TASK, "Delete", task_pb2.DeleteRequest(id=tid), task_pb2.DeleteResponse)
        # Connect never fails (spec §7.6), whatever the id.
        got = await client.call(TASK, "Connect", task_pb2.ConnectRequest(id="../x"), task_pb2.ConnectResponse)
        assert got.task_pid == 0
    finally:
        await client.close()


def test_bad_exec_and_task_ids_are_refused_and_leave_nothing(containerd: PrivateContainerd, ctr: Ctr) -> None:
    ctr.check("run", "-d", "--runtime", PODSHIM, IMAGE, "target", "sleep", "600")
    ctr.wait_task_status("target", "RUNNING")
    bundle = bundle_of(containerd, ctr, "target")
    init_pid = (bundle / "init.pid").read_text()
    before = listing(bundle, bundle.parent, bundle.parent.parent)
    sock = (bundle / "address").read_text().removeprefix("unix://")

    asyncio.run(_refuse_bad_exec_ids(sock, "target"))
    res = ctr.run("task", "exec", "--exec-id", "init", "target", "true")
    assert res.rc != 0 and "reserved for the container's init process" in res.stderr, res

    assert listing(bundle, bundle.parent, bundle.parent.parent) == before
    assert (bundle / "init.pid").read_text() == init_pid
    # The task is untouched and still serves execs; an exec's pid file is its own.
    assert ctr.check("task", "exec", "--exec-id", "init-2", "target", "echo", "fine").strip() == "fine"
    assert (bundle / "init.pid").read_text() == init_pid
    ctr.check("task", "kill", "-s", "KILL", "target")
    ctr.wait_task_status("target", "STOPPED")
    ctr.check("task", "delete", "target")
    ctr.check("container", "rm", "target")


@pytest.mark.parametrize("annotation", ["io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id"])
def test_a_bad_grouping_key_is_refused_by_the_start_action(ctr: Ctr, annotation: str) -> None:
    """The key names the shim's socket and a VM pod's run dir, later removed recursively."""
    extra = ["--annotation", "io.kubernetes.cri.container-type=sandbox"] if "sandbox" in annotation else []
    rc, _, err = run_podshim(ctr, "--annotation", f"{annotation}=../../run", *extra, IMAGE, "g1", "true")
    assert rc != 0 and f"annotation '{annotation}': '../../run' is not a valid identifier" in err, err
    ctr.run("container", "rm", "g1")
