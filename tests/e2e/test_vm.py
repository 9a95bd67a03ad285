"""VM isolation through ctr: a standalone container annotated ``podshim.io/isolation=vm`` runs in a
pod VM of its own.  Each test boots at most one VM (TCG is slow), one test at a time; the e2e
guard fails any test that leaves a qemu, mount or socket behind.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from harness import leaks
from harness.containerd import PrivateContainerd
from harness.ctr import Ctr
from harness.poll import wait_until
from harness.runtimes import PODSHIM

from podshim.backends.vm.backend import FAULT_ANNOTATION, FAULTS_ENV
from podshim.vm import image as vmimage
from podshim.vm import qemu
from podshim.vm import template as vmtemplate

IMAGE = "docker.io/library/busybox:latest"
VM = "podshim.io/isolation=vm"

# Read by the shims the session's containerd starts (they inherit its environment, which is ours).
os.environ[FAULTS_ENV] = "1"


def _image() -> vmimage.Image:
    try:
        return vmimage.locate()
    except vmimage.ImageError as e:
        pytest.fail(f"{e}", pytrace=False)


_qemu_pids = leaks.qemu_pids


def _assert_no_vm_left() -> None:
    """No qemu, and nothing of any pod VM (run dir, share, mounts) under the run root."""
    _wait(lambda: not _qemu_pids(), 20, "qemu to exit")
    root = qemu.run_root()

    def run_dirs() -> list[str]:
        return [e for e in (os.listdir(root) if os.path.isdir(root) else []) if e != "boot-slots"]

    # The shim tears the run dir down just after qemu's exit is reaped: give it a moment.
    deadline = time.monotonic() + 10
    while run_dirs() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = run_dirs()
    assert left == [], f"pod VM run dirs left in {root}: {left}"
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if f" {root}/" in line], "mounts left under the VM run root"


_wait = wait_until


def test_standalone_vm_container(ctr: Ctr) -> None:
    """One VM: the guest kernel, exit codes, execs, a SIGKILLed exec that leaves the VM up, stop."""
    img = _image()
    assert img.release != os.uname().release
    t0 = time.monotonic()
    out = ctr.check(
        "run", "--runtime", PODSHIM, "--annotation", VM, "-d", IMAGE, "vm1", "sh", "-c", "sleep 1000",
        timeout=240,
    )  # fmt: skip
    started = time.monotonic() - t0
    assert out == ""
    _wait(lambda: ctr.task_status("vm1") == "RUNNING", 10, "vm1 RUNNING")
    assert len(_qemu_pids()) == 1

    t1 = time.monotonic()
    res = ctr.run("task", "exec", "--exec-id", "e1", "vm1", "sh", "-c", "uname -r; echo err >&2; exit 7")
    first_exec = time.monotonic() - t1
    assert res.rc == 7, res
    assert res.stdout.strip() == img.release
    assert "err" in res.stderr

    # stdin reaches the guest and EOF comes back.
    res = ctr.run("task", "exec", "--exec-id", "e2", "vm1", "sh", "-c", "wc -c", input="hello vm\n")
    assert res.rc == 0 and res.stdout.strip() == "9", res

    # SIGKILL of an exec is an ordinary exit in the guest: the VM and the task stay.
    ctr.check("task", "exec", "-d", "--exec-id", "e3", "vm1", "sleep", "1000")
    pids = ctr.check("task", "ps", "vm1")
    assert len(pids.strip().splitlines()) >= 3, pids  # header, init, sleep
    ctr.check("task", "kill", "--exec-id", "e3", "-s", "SIGKILL", "vm1")
    time.sleep(0.5)
    assert ctr.task_status("vm1") == "RUNNING"
    assert ctr.check("task", "exec", "--exec-id", "e4", "vm1", "echo", "still here").strip() == "still here"

    # A terminal exec: the guest's pty, through a raw local one.
    res = ctr.run_tty("task", "exec", "-t", "--exec-id", "t1", "vm1", "sh", "-c", "tty; exit 4", timeout=60)
    assert res.rc == 4 and "/dev/pts/" in res.stdout, res

    # Pause and resume act on the guest's cgroup.
    ctr.check("task", "pause", "vm1")
    assert ctr.task_status("vm1") == "PAUSED"
    ctr.check("task", "resume", "vm1")
    assert ctr.task_status("vm1") == "RUNNING"

    # Stats: the owner task (vm1 owns the VM) reports what the VM costs the node, qemu's resident
    # memory, which no small container in the guest comes near.
    metrics = ctr.check("task", "metrics", "vm1", "--format", "json")
    usage = json.loads(metrics)["memory"]["usage"]
    assert usage > 64 * 1024 * 1024, metrics

    # A second container grouped into the same shim runs in the same VM; an OOM kill there is
    # reported as TaskOOM and exit 137, and leaves vm1 alone.
    group = "io.containerd.runc.v2.group=vm1"
    with ctr.events() as events:
        ctr.check(
            "run", "-d", "--runtime", PODSHIM, "--annotation", VM, "--annotation", group,
            "--memory-limit", str(32 << 20), IMAGE, "oom1", "dd", "if=/dev/zero", "of=/dev/null", "bs=64M",
            timeout=60,
        )  # fmt: skip
        events.wait_for(lambda e: e.topic == "/tasks/oom" and e.container_id == "oom1", timeout=30)
        ev = events.wait_for(lambda e: e.topic == "/tasks/exit" and e.container_id == "oom1", timeout=30)
    assert ev.payload.get("exit_status") == 137, ev
    assert len(_qemu_pids()) == 1
    ctr.check("task", "delete", "oom1")
    ctr.check("container", "delete", "oom1")
    assert ctr.task_status("vm1") == "RUNNING"

    ctr.check("task", "kill", "-s", "SIGKILL", "vm1")
    _wait(lambda: ctr.task_status("vm1") == "STOPPED", 20, "vm1 STOPPED")
    ctr.check("task", "delete", "vm1")
    ctr.check("container", "delete", "vm1")
    _assert_no_vm_left()
    print(f"\nvm container detached start: {started:.2f} s, first exec round trip: {first_exec:.2f} s")


def test_vm_run_exit_code_and_output(ctr: Ctr) -> None:
    """`ctr run --rm`: output and exit status of a short-lived VM container, nothing left after."""
    img = _image()
    t0 = time.monotonic()
    res = ctr.run(
        "run", "--rm", "--runtime", PODSHIM, "--annotation", VM, IMAGE, "vm2",
        "sh", "-c", "echo out; uname -r; exit 3",
        timeout=240,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert res.rc == 3, res
    assert res.stdout.split() == ["out", img.release]
    _assert_no_vm_left()
    print(f"\nctr run --rm in a VM, start to exit: {elapsed:.2f} s")


def test_qemu_killed_from_outside(ctr: Ctr) -> None:
    """qemu SIGKILLed from outside: the task exits with status 1 and the shim cleans up."""
    ctr.check(
        "run", "--runtime", PODSHIM, "--annotation", VM, "-d", IMAGE, "vm3", "sleep", "1000", timeout=240
    )
    _wait(lambda: ctr.task_status("vm3") == "RUNNING", 10, "vm3 RUNNING")
    (pid,) = _qemu_pids()
    with ctr.events() as events:
        os.kill(pid, signal.SIGKILL)
        ev = events.wait_for(lambda e: e.topic == "/tasks/exit", timeout=20)
    assert ev.payload.get("exit_status") == 1, ev
    _wait(lambda: ctr.task_status("vm3") == "STOPPED", 10, "vm3 STOPPED")
    ctr.check("task", "delete", "vm3")
    ctr.check("container", "delete", "vm3")
    _assert_no_vm_left()


def test_agent_crash(ctr: Ctr) -> None:
    """The guest agent (PID 1) dies: the kernel panics, qemu exits, the task exits with status 1."""
    with ctr.events() as events:
        ctr.check(
            "run", "--runtime", PODSHIM, "--annotation", VM,
            "--annotation", f"{FAULT_ANNOTATION}=agent-crash",
            "-d", IMAGE, "vm4", "sleep", "1000",
            timeout=240,
        )  # fmt: skip
        ev = events.wait_for(lambda e: e.topic == "/tasks/exit", timeout=30)
    assert ev.payload.get("exit_status") == 1, ev
    _assert_no_vm_left()
    ctr.check("task", "delete", "vm4")
    ctr.check("container", "delete", "vm4")


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ("podshim.io/vm.memory-mib=64", "below the minimum"),
        ("podshim.io/vm.vcpus=lots", "not an integer"),
        # More than the handler's base size, which the admin did not raise: refused before qemu.
        ("podshim.io/vm.memory-mib=16384", "exceeds the handler's limit of 256 MiB (vm.max_memory_mib"),
        ("podshim.io/vm.vcpus=2", "exceeds the handler's limit of 1 (vm.max_vcpus"),
    ],
)
def test_bad_vm_option_is_invalid_argument(
    containerd: PrivateContainerd, ctr: Ctr, annotation: str, message: str
) -> None:
    res = ctr.run("run", "--rm", "--runtime", PODSHIM, "--annotation", VM, "--annotation", annotation,
                  IMAGE, "vm5", "true", timeout=60)  # fmt: skip
    assert res.rc != 0
    assert message in res.stderr and "invalid argument" in res.stderr.lower(), res.stderr
    ctr.run("container", "delete", "vm5")
    _assert_no_vm_left()


def test_killed_shim_takes_its_vm(containerd: PrivateContainerd, ctr: Ctr) -> None:
    """SIGKILL of the shim: qemu dies with it (PDEATHSIG), containerd reports the exit."""
    ctr.check("run", "--runtime", PODSHIM, "--annotation", VM, "-d", IMAGE, "vm6", "sleep", "1000",
              timeout=240)  # fmt: skip
    _wait(lambda: ctr.task_status("vm6") == "RUNNING", 10, "vm6 RUNNING")
    (qpid,) = _qemu_pids()
    with open(f"/proc/{qpid}/stat") as f:
        shim = int(f.read().rsplit(")", 1)[1].split()[1])
    with open(f"/proc/{shim}/cmdline") as f:
        assert "containerd-shim-podshim" in f.read()
    with ctr.events() as events:
        os.kill(shim, signal.SIGKILL)
        events.wait_for(lambda e: e.topic == "/tasks/exit" and e.container_id == "vm6", timeout=20)
    _wait(lambda: not _qemu_pids(), 10, "qemu to die with its shim")
    _wait(lambda: ctr.task_status("vm6") is None, 10, "containerd to forget vm6")
    ctr.check("container", "rm", "vm6")
    # containerd ran the shim's `delete` action: the dead shim's share mounts and run dir are gone.
    _assert_no_vm_left()


# -- templates (docs/vm-isolation.md): this session's own, in its private /run ----------------------


def _qemu_cmdline() -> list[str]:
    (pid,) = _qemu_pids()
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")


def _is_clone(argv: list[str]) -> bool:
    """A clone resumes from its template's state; a cold boot boots the kernel."""
    if "-incoming" in argv:
        assert "-kernel" not in argv
        return True
    assert "-kernel" in argv
    return False


def _templates() -> dict[str, float]:
    """Template dirs of this session: when each was built."""
    root = vmtemplate.root()
    out = {}
    for entry in os.listdir(root) if os.path.isdir(root) else []:
        meta = os.path.join(root, entry, vmtemplate.META_FILE)
        if not entry.startswith(".") and os.path.isfile(meta):
            with open(meta) as f:
                out[entry] = float(json.load(f)["built_at"])
    return out


def _run_detached(ctr: Ctr, name: str, *extra: str) -> None:
    ctr.check("run", "--runtime", PODSHIM, "--annotation", VM, *extra, "-d", IMAGE, name, "sleep", "1000",
              timeout=240)  # fmt: skip
    _wait(lambda: ctr.task_status(name) == "RUNNING", 10, f"{name} RUNNING")
    assert ctr.check("task", "exec", "--exec-id", "e", name, "echo", "up").strip() == "up"


def _remove(ctr: Ctr, name: str) -> None:
    ctr.check("task", "kill", "-s", "SIGKILL", name)
    _wait(lambda: ctr.task_status(name) == "STOPPED", 20, f"{name} STOPPED")
    ctr.check("task", "delete", name)
    ctr.check("container", "delete", name)
    _assert_no_vm_left()


def test_vm_template_unusable_cold_fallback_then_rebuilt(ctr: Ctr) -> None:
    """A template whose state cannot be restored: the pod still starts, cold; the template is
    removed; the next pod builds a new one and is its clone."""
    _run_detached(ctr, "vmt1")  # builds this session's template unless an earlier test did
    assert _is_clone(_qemu_cmdline())
    _remove(ctr, "vmt1")
    ((key, built),) = _templates().items()
    state = os.path.join(vmtemplate.root(), key, vmtemplate.STATE_FILE)
    os.chmod(state, 0o600)  # no clone of it runs now: the only time a template may change
    with open(state, "wb") as f:
        f.write(b"not a migration stream")

    _run_detached(ctr, "vmt2")
    assert not _is_clone(_qemu_cmdline())
    assert _templates() == {}, "the unusable template is still there"
    _remove(ctr, "vmt2")

    _run_detached(ctr, "vmt3")
    assert _is_clone(_qemu_cmdline())
    ((key3, built3),) = _templates().items()
    assert key3 == key and built3 > built
    _remove(ctr, "vmt3")


def test_vm_template_false_boots_cold(ctr: Ctr, tmp_path: Path) -> None:
    """`vm.template = false` in the handler's options: a cold boot even with a template at hand."""
    options = tmp_path / "podshim.toml"
    options.write_text('isolation = "vm"\n[vm]\ntemplate = false\n')
    _run_detached(ctr, "vmc1", "--runtime-config-path", str(options))
    assert not _is_clone(_qemu_cmdline())
    _remove(ctr, "vmc1")
