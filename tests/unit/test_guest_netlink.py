"""The agent's rtnetlink requests (:mod:`podshim.guest.netlink`) against the real kernel, in a
network namespace of their own with a veth standing in for the guest's eth0."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

import pytest

from podshim.guest import netlink

DRIVER = r"""
import json, socket, subprocess, sys
from podshim.guest import netlink
subprocess.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"], check=True)
req = json.loads(sys.argv[1])
msgs = netlink.setup_messages(
    socket.if_nametoindex("eth0"), mac=req["mac"], mtu=req["mtu"], up=req["up"],
    addresses=[netlink.Address(a, n) for a, n in req["addresses"]],
    routes=[netlink.Route(d, n, g, v) for d, n, g, v in req["routes"]],
)
out = {}
try:
    netlink.apply(msgs)
    netlink.apply(msgs)  # a set-up retried: addresses already there are as wanted
except netlink.NetlinkError as e:
    out["error"] = str(e)
def ip(*a):
    return json.loads(subprocess.run(["ip", "-j", *a], capture_output=True, text=True, check=True).stdout)
out["link"] = ip("link", "show", "eth0")[0]
out["addr"] = ip("addr", "show", "eth0")[0]["addr_info"]
out["routes"] = ip("route", "show") + ip("-6", "route", "show")
print(json.dumps(out))
"""

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"),
    reason="needs root, unshare(1) and ip(8) for a network namespace with a veth",
)


def _drive(req: dict[str, Any]) -> dict[str, Any]:
    res = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", DRIVER, json.dumps(req)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def test_the_pods_mac_mtu_addresses_and_routes() -> None:
    out = _drive({
        "mac": "02:aa:bb:cc:dd:ee", "mtu": 1400, "up": True,
        "addresses": [["10.9.8.7", 24], ["fd00::7", 64]],
        "routes": [["", 0, "10.9.8.1", 4], ["10.77.0.0", 16, "", 4], ["", 0, "fd00::1", 6]],
    })  # fmt: skip
    assert "error" not in out, out
    assert out["link"]["address"] == "02:aa:bb:cc:dd:ee" and out["link"]["mtu"] == 1400
    assert "UP" in out["link"]["flags"]
    got = {(a["local"], a["prefixlen"]) for a in out["addr"]}
    assert {("10.9.8.7", 24), ("fd00::7", 64)} <= got
    routes = {(r["dst"], r.get("gateway", ""), r.get("scope", "")) for r in out["routes"]}
    assert ("default", "10.9.8.1", "") in routes or ("default", "10.9.8.1", "global") in routes, routes
    assert ("10.77.0.0/16", "", "link") in routes, routes
    assert any(r[0] == "default" and r[1] == "fd00::1" for r in routes), routes


def test_without_a_pod_network_the_link_only_gets_its_mac_and_stays_down() -> None:
    out = _drive({"mac": "02:00:00:00:00:01", "mtu": 0, "up": False, "addresses": [], "routes": []})
    assert "error" not in out and out["link"]["address"] == "02:00:00:00:00:01"
    assert "UP" not in out["link"]["flags"]


def test_a_refused_request_is_named() -> None:
    out = _drive({
        "mac": "", "mtu": 1500, "up": True, "addresses": [["10.9.8.7", 24]],
        "routes": [["", 0, "192.0.2.1", 4]],  # a gateway no address reaches
    })  # fmt: skip
    assert "route replace default via 192.0.2.1" in out["error"], out


def test_acks_are_matched_by_sequence() -> None:
    def ack(seq: int, code: int) -> bytes:
        head = netlink._HEADER.pack(36, netlink.NLMSG_ERROR, 0, seq, 0)
        return head + code.to_bytes(4, "little", signed=True) + b"\0" * 16

    ok, refused = ack(3, 0), ack(4, -17)
    assert netlink.ack_error(ok + refused, 3) == 0
    assert netlink.ack_error(ok + refused, 4) == 17
    assert netlink.ack_error(ok, 5) is None
    assert netlink.ack_error(b"\x01\x00", 1) is None
