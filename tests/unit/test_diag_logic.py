"""Pure logic behind Diag: logfmt lines, the in-memory log ring, what is logged at info, the
shim's counters, the lazy Diag service and request observer on the ttrpc server, finding a pod
by what an operator types, and the monitor's Prometheus families."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from podshim import options
from podshim.api import diag_pb2 as D
from podshim.api import task_pb2
from podshim.cli.diag import AmbiguousError, NotFoundError, ShimView, resolve
from podshim.cli.discovery import ShimProcess
from podshim.cli.monitor import Scrape, families
from podshim.errdefs import Code
from podshim.service import TaskService
from podshim.shim import logfmt
from podshim.shim.telemetry import Histogram, Telemetry
from podshim.ttrpc.client import Client
from podshim.ttrpc.server import Method, Server

# -- logfmt -------------------------------------------------------------------------------------


@given(st.text())
def test_logfmt_quote_parses_back(value: str) -> None:
    line = f"msg={logfmt.quote(value)} runtime=x"
    assert logfmt.parse(line) == {"msg": value, "runtime": "x"}


def test_logfmt_quotes_like_logrus() -> None:
    assert logfmt.quote("Create") == "Create"
    assert logfmt.quote("a b") == '"a b"'
    assert logfmt.quote("") == '""'
    assert logfmt.quote("2026-01-02T03:04:05.000000001Z") == '"2026-01-02T03:04:05.000000001Z"'
    assert logfmt.rfc3339(1.5) == "1970-01-01T00:00:01.500000000Z"


def test_hostile_text_cannot_forge_lines_or_drive_a_terminal() -> None:
    evil = "ok\x1b[2J\x9b31m\u2028level=fatal msg=forged\r"
    line = f"msg={logfmt.quote(evil)}"
    assert line.isprintable() and len(line.splitlines()) == 1
    assert logfmt.parse(line)["msg"] == evil
    shown = logfmt.printable("frame 1\n\tframe 2\x1b]0;title\x07")
    assert shown.splitlines() == ["frame 1", "\tframe 2\\x1b]0;title\\x07"]


def _record(msg: str, level: int = logging.INFO, **extra: str) -> logging.LogRecord:
    rec = logging.LogRecord("podshim", level, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return rec


def test_handler_writes_fields_and_keeps_a_ring() -> None:
    r, w = os.pipe()
    try:
        h = logfmt.LogfmtHandler(w, "pod-1", keep=3)
        h.emit(_record("Start", id="c1", method="Start", duration="0.001s"))
        line = os.read(r, 4096).decode()
    finally:
        os.close(r)
        os.close(w)
    fields = logfmt.parse(line.strip())
    assert fields["level"] == "info" and fields["msg"] == "Start" and fields["pod"] == "pod-1"
    assert (fields["id"], fields["method"], fields["duration"]) == ("c1", "Start", "0.001s")
    assert "exec" not in fields  # empty fields are left out
    for i in range(4):
        h.emit(_record(f"m{i}", logging.WARNING))
    lines, dropped = h.since(0)
    assert [s for s, _ in lines] == [3, 4, 5] and dropped == 2
    assert logfmt.parse(lines[0][1])["level"] == "warning"
    assert h.since(5) == ([], 0)


async def test_only_lifecycle_methods_are_logged_at_info() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    handler = logfmt.install(-1, "pod-x", debug=False)
    try:
        svc = TaskService(
            namespace="ns",
            events=None,
            start_options=options.ShimOptions(),
            on_shutdown=lambda: None,  # type: ignore[arg-type]
        )
        methods = svc.methods()
        for _ in range(5):
            with pytest.raises(Exception, match="not created"):
                await methods["State"].handler(task_pb2.StateRequest(id="c1"), None)  # type: ignore[arg-type]
        assert handler.since(0) == ([], 0), "State must not log at info"
        with pytest.raises(Exception, match="not created"):
            await methods["Kill"].handler(task_pb2.KillRequest(id="c1", exec_id="e1"), None)  # type: ignore[arg-type]
        (line,) = [logfmt.parse(t) for _, t in handler.since(0)[0]]
        assert (line["method"], line["id"], line["exec"], line["pod"]) == ("Kill", "c1", "e1", "pod-x")
        assert line["duration"].endswith("s") and line["msg"].startswith("Kill failed")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        logfmt.HANDLER = None


# -- telemetry ------------------------------------------------------------------------------------


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.cumulative() == [2, 3, 4] and h.count == 4 and h.sum == pytest.approx(3.65)


def test_lifecycle_times_from_events() -> None:
    t = Telemetry()
    t.task_event("/tasks/create", "c1")
    t.task_event("/tasks/start", "c1")
    t.task_event("/tasks/exec-added", "c1", "e1")
    t.task_event("/tasks/exit", "c1")
    t.task_event("/tasks/exit", "c1")  # only the first exit counts
    lc = t.lifecycles[("c1", "")]
    assert lc.created <= lc.started <= lc.exited
    assert t.create_to_start.count == 1 and t.start_to_exit.count == 1
    t.task_event("/tasks/delete", "c1")
    assert not t.lifecycles


# -- the ttrpc server: lazy services, the observer -------------------------------------------------


async def test_lazy_service_loads_at_first_request_and_requests_are_observed() -> None:
    seen: list[tuple[str, str, int]] = []
    loaded: list[bool] = []

    async def state(req: task_pb2.StateRequest, ctx: object) -> task_pb2.StateResponse:
        if req.id == "missing":
            from podshim.errdefs import NotFound

            raise NotFound("no such task")
        return task_pb2.StateResponse(id=req.id)

    def lazy() -> dict[str, Method]:
        loaded.append(True)
        return {"State": Method(task_pb2.StateRequest, state)}  # type: ignore[arg-type]

    def broken() -> dict[str, Method]:
        raise ImportError("no module named podshim.nothing")

    server = Server(
        {"svc.Lazy": lazy, "svc.Broken": broken}, observer=lambda s, m, c, secs: seen.append((s, m, c))
    )
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "s.sock")
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen()
        sock.setblocking(False)
        serving = asyncio.get_running_loop().create_task(server.serve(sock))
        try:
            assert not loaded
            async with await Client.connect(path) as c:
                with pytest.raises(Exception, match="failed to load: no module named podshim.nothing"):
                    await c.call("svc.Broken", "State", task_pb2.StateRequest(id="a"), task_pb2.StateResponse)
                assert (
                    await c.call("svc.Lazy", "State", task_pb2.StateRequest(id="a"), task_pb2.StateResponse)
                ).id == "a"
                with pytest.raises(Exception, match="no such task"):
                    await c.call(
                        "svc.Lazy", "State", task_pb2.StateRequest(id="missing"), task_pb2.StateResponse
                    )
            assert loaded == [True]
            assert seen == [("svc.Lazy", "State", Code.OK), ("svc.Lazy", "State", Code.NOT_FOUND)]
        finally:
            await server.close()
            await serving


# -- finding a pod ---------------------------------------------------------------------------------


def _view(pid: int, pod_id: str, name: str, containers: list[str]) -> ShimView:
    shim = ShimProcess(pid, "k8s.io", "/run/c.sock", pod_id, "/b", "/s")
    tasks = D.TasksResponse(
        pod=D.PodInfo(id=pod_id, name=name, namespace="default"),
        tasks=[D.TaskInfo(id=c) for c in [pod_id, *containers]],
    )
    return ShimView(shim, tasks)


def test_resolve_by_name_prefix_id_prefix_or_container() -> None:
    views = [_view(10, "aaaa1111", "web-1", ["c-web"]), _view(11, "bbbb2222", "web-2", ["c-db"])]
    assert resolve(views, "web-1")[0].shim.pid == 10
    assert resolve(views, "bbbb")[0].shim.pid == 11
    assert resolve(views, "c-db") == (views[1], "c-db")
    with pytest.raises(AmbiguousError, match="matches 2 pods") as e:
        resolve(views, "web")
    assert "web-1" in str(e.value) and "web-2" in str(e.value)
    with pytest.raises(NotFoundError, match="looked at 2 podshim process") as e2:
        resolve(views, "nothing")
    assert "10, 11" in str(e2.value) and "k8s.io" in str(e2.value)
    with pytest.raises(NotFoundError, match="no podshim process is running"):
        resolve([], "x")


# -- the monitor's families ------------------------------------------------------------------------


def test_monitor_labels_and_up() -> None:
    ok = Scrape(ShimProcess(10, "k8s.io", "/run/c.sock", "pod-a", "/b", "/s"))
    ok.tasks = D.TasksResponse(
        pod=D.PodInfo(id="pod-a", name="web", namespace="prod", uid="u1", isolation="vm")
    )
    ok.metrics = D.MetricsResponse(
        families=[
            D.MetricFamily(name="podshim_ttrpc_requests_total", type="counter", help="h",
                           samples=[D.Sample(labels={"method": "State", "code": "OK"}, value=7)]),
            D.MetricFamily(name="podshim_ttrpc_request_duration_seconds", type="histogram", help="h",
                           samples=[D.Sample(labels={"method": "State"}, value=0.5, count=3,
                                             bucket_bounds=[0.1, float("inf")], bucket_counts=[2, 3])]),
            D.MetricFamily(name="podshim_container_create_to_start_seconds", type="gauge", help="h",
                           samples=[D.Sample(labels={"container": "app"}, value=0.2)]),
        ]
    )  # fmt: skip
    silent = Scrape(
        ShimProcess(11, "k8s.io", "/run/c.sock", "pod-b", "/b", "/s"), D.PodInfo(id="pod-b", name="db")
    )
    silent.error = "timed out"

    class Static:
        def collect(self) -> list[object]:
            return families([ok, silent])  # type: ignore[return-value]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Static())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip

    def get(name: str, **labels: str) -> float:
        (v,) = [v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items()]
        return v

    assert get("podshim_up", pod="web", namespace="prod", uid="u1", isolation="vm") == 1
    assert get("podshim_up", pod="db", pod_id="pod-b") == 0, "a silent shim keeps its last labels"
    assert get("podshim_ttrpc_requests_total", pod="web", method="State", code="OK") == 7
    assert get("podshim_ttrpc_request_duration_seconds_bucket", pod="web", le="0.1") == 2
    assert get("podshim_ttrpc_request_duration_seconds_count", pod="web") == 3
    assert get("podshim_container_create_to_start_seconds", pod="web", container="app") == 0.2


# -- shares: guest paths, on both sides ------------------------------------------------------------


@pytest.mark.parametrize("path", ["relative", "/", "/usr/bin", "/run/podshim/agent", "/proc/1", "/mnt/../usr",
                                  "/dev/sda", "/a\0b"])  # fmt: skip
def test_share_targets_that_are_refused(path: str) -> None:
    from podshim import errdefs
    from podshim.backends.vm.diag import _guest_target
    from podshim.guest.diag import DiagError, DiagOps

    with pytest.raises(errdefs.InvalidArgument):
        _guest_target(path)
    with pytest.raises(DiagError):
        DiagOps().op_diag_share({"source": "/run/podshim/shared/.diag/1", "target": path})


def test_guest_refuses_a_share_source_outside_the_pod_share() -> None:
    from podshim.guest.diag import DiagError, DiagOps

    for source in ("/etc", "/run/podshim/shared/../../etc", ""):
        with pytest.raises(DiagError, match="not in the pod share"):
            DiagOps().op_diag_share({"source": source, "target": "/mnt/x"})


async def test_event_outcomes_are_counted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """containerd unreachable: every attempt after the first is a retry, then the event is dropped."""
    from podshim.api import events_pb2
    from podshim.shim import publisher as pub
    from podshim.shim.telemetry import TELEMETRY

    async def no_wait(seconds: float) -> None:
        return None

    monkeypatch.setattr(pub.asyncio, "sleep", no_wait)
    before = dict(TELEMETRY.events)
    p = pub.EventPublisher(str(tmp_path / "no-containerd.sock"), "ns")
    p.publish("/tasks/oom", events_pb2.TaskOOM(container_id="c1"))
    await p.close(timeout=5)
    delta = {k: TELEMETRY.events[k] - before[k] for k in before}
    assert delta == {"published": 0, "retried": pub.RETRIES, "dropped": 1}


def test_discovery_takes_only_servers_containerd_started(monkeypatch: pytest.MonkeyPatch) -> None:
    from podshim.cli import discovery

    me = os.getpid()
    flags = b"-namespace\0k8s.io\0-address\0/c.sock\0-id\0p1\0"
    argvs = {
        "server": b"python\0/x/containerd-shim-podshim-v1\0" + flags + b"start\0",
        "delete": b"containerd-shim-podshim-v1\0" + flags + b"delete\0",
        "no flags": b"/x/containerd-shim-podshim-v1-zygote\0serve\0",
        "other": b"containerd-shim-runc-v2\0" + flags + b"start\0",
    }
    for what, argv in argvs.items():
        monkeypatch.setattr(
            discovery, "_read", lambda path, argv=argv: argv if path.endswith("cmdline") else b"unix:///s"
        )
        monkeypatch.setattr(discovery.os, "getsid", lambda pid: pid)
        monkeypatch.setattr(
            discovery.os, "readlink", lambda path: "/state/io.containerd.runtime.v2.task/k8s.io/p1"
        )
        found = discovery.shim_process(me)
        assert (found is not None) == (what == "server"), what
        if found is not None:
            assert (found.namespace, found.id, found.socket) == ("k8s.io", "p1", "/s")
