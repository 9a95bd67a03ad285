"""Scenario 3, RPC cost: a raw ttrpc client sends State and Connect straight to a running shim.

One pod per runtime with one running container; the socket comes from the container bundle's
`address` file (podshim's under containerd's state dir, runc-v2's under /run/containerd/s).
Round trips are sequential on one connection; throughput keeps `DEPTH` requests in flight on
each of 1 and of 8 connections, as containerd pipelines its calls. Rounds alternate A B A B.

The client (bench/ttrpc_raw.py) builds each frame once and counts replies by their headers, so
it costs a few µs per call; it still shares the two cores with the shim it measures.
"""

from __future__ import annotations

from bench.env import ORDER, RUNTIMES, Env
from bench.pods import remove_pod, start_pod
from bench.procs import cpu_ns, shim_pid
from bench.stats import ScenarioResult
from bench.ttrpc_raw import latencies, socket_path, throughput
from podshim.api import task_pb2

NAME = "rpc"
TITLE = "RPC cost: raw ttrpc State / Connect to the running shim"
DEPTH = 4


def run(env: Env, calls: int = 2000, rounds: int = 5, total: int = 4000) -> ScenarioResult:
    res = ScenarioResult(NAME, TITLE)
    pods = {}
    pids: dict[str, int] = {}
    try:
        targets = {}
        for rt in ORDER:
            pod, t = start_pod(env, rt, f"rpc-{rt}")
            pods[rt] = pod
            cid = t.container_ids[0]
            targets[rt] = (socket_path(env.cd.bundle(cid)), cid)
            pids[rt] = shim_pid(RUNTIMES[rt].binary, pod.id)
        # The client shares the 2 cores, so requests per second partly measure the client; the
        # shim's own CPU time per request (schedstat, all threads) does not.
        cpu: dict[str, list[float]] = {}
        lat: dict[str, dict[str, list[float]]] = {"State": {}, "Connect": {}}
        tput: dict[str, dict[str, list[float]]] = {"1": {}, "8": {}}
        per_round = max(1, calls // rounds)
        for _ in range(rounds):
            for rt in ORDER:
                path, cid = targets[rt]
                lat["State"].setdefault(rt, []).extend(
                    latencies(path, "State", task_pb2.StateRequest(id=cid), per_round)
                )
                lat["Connect"].setdefault(rt, []).extend(
                    latencies(path, "Connect", task_pb2.ConnectRequest(id=cid), per_round)
                )
            for rt in ORDER:
                path, cid = targets[rt]
                for conns in (1, 8):
                    before = cpu_ns(pids[rt])
                    tput[str(conns)].setdefault(rt, []).append(
                        throughput(
                            path,
                            "State",
                            task_pb2.StateRequest(id=cid),
                            connections=conns,
                            depth=DEPTH,
                            total=total,
                        )
                    )
                    cpu.setdefault(rt, []).append((cpu_ns(pids[rt]) - before) / 1e9 / total)
        res.row("State round trip", "s", lat["State"], target=1.5)
        res.row("Connect round trip", "s", lat["Connect"])
        res.row("shim CPU per State request (throughput runs)", "s", cpu)
        for n_conns in ("1", "8"):
            res.row(
                f"State throughput, {n_conns} connection(s), {DEPTH} in flight each",
                "req/s",
                tput[n_conns],
                better="higher",
                note="ratio < 1 means podshim serves fewer requests per second",
            )
    finally:
        for pod in pods.values():
            remove_pod(env, pod)
    return res
