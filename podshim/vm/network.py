"""The pod's network, moved into its VM: the CNI interface's addresses go to the guest's eth0,
and its frames go through a tap (Kata's "tc mirred" model).

CNI sets up a veth in the pod's network namespace and gives it the pod IP.  The VM's virtio-net
device is backed by a tap that qemu creates in that namespace (qemu runs there, and the tap,
not being persistent, goes away with qemu).  Two ingress filters join them: whatever arrives on
the veth leaves through the tap, and whatever the guest sends leaves through the veth.  The guest
takes the veth's MAC, addresses and routes, so to the rest of the network nothing changed.

All netlink work runs in a worker thread that enters the pod's namespace with ``setns`` (a
per-thread property) and leaves it again: pyroute2's own NetNS helper forks, and every child of
the shim belongs to its one reaper.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
INGRESS = 0xFFFF0000
TAP_NAME = "podshim0"
RT_TABLE_MAIN = 254
RTPROT_KERNEL = 2

_libc = ctypes.CDLL(None, use_errno=True)
# pyroute2 logs every netlink message at debug level; the shim's debug log is for Task API calls.
logging.getLogger("pyroute2").setLevel(logging.WARNING)


class NetworkError(Exception):
    pass


@dataclass(frozen=True)
class Address:
    family: int
    address: str
    prefixlen: int


@dataclass(frozen=True)
class Route:
    family: int
    dst: str  # "" for the default route
    dst_len: int
    gateway: str


@dataclass(frozen=True)
class PodNetwork:
    """The CNI interface of a pod's network namespace, as the guest must take it over."""

    netns: str
    ifname: str
    index: int
    mac: str
    mtu: int
    addresses: tuple[Address, ...] = ()
    routes: tuple[Route, ...] = field(default=())


def pod_netns(spec: dict[str, Any]) -> str:
    """The network namespace CRI made for the pod (a bind-mounted path), or "" (host network, or
    a plain ctr container with a namespace of its own and no interface in it)."""
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network":
            path = str(ns.get("path") or "")
            return "" if path.startswith("/proc/") else path
    return ""


def guest_network(net: PodNetwork) -> dict[str, Any]:
    """The agent's ``setup`` ``network``: MTU, addresses and routes for the guest's interface
    (the agent sends them as rtnetlink requests, :mod:`podshim.guest.netlink`)."""
    return {
        "mtu": net.mtu,
        "addresses": [[a.address, a.prefixlen] for a in net.addresses],
        "routes": [
            [r.dst if r.dst_len else "", r.dst_len, r.gateway or "", 6 if r.family == socket.AF_INET6 else 4]
            for r in net.routes
        ],
    }


# -- netlink, in a worker thread -------------------------------------------------------------------


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetworkError(f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def _ipr_in(netns: str) -> Iterator[Any]:
    """An IPRoute whose netlink socket lives in ``netns``; the calling thread is back in its own
    namespace before this returns."""
    from pyroute2 import IPRoute  # type: ignore[import-untyped]  # imported only by VM pods

    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        os.close(own)
        raise NetworkError(f"cannot open the pod's network namespace {netns}: {e}") from e
    try:
        _setns(target)
        try:
            ipr = IPRoute()
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)
    try:
        yield ipr
    finally:
        ipr.close()


def _is_global(family: int, address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not (ip.is_link_local or ip.is_loopback) if family == socket.AF_INET6 else not ip.is_loopback


def read_pod_network(netns: str) -> PodNetwork | None:
    """The namespace's one interface besides lo (and our tap), or None when it has none."""
    with _ipr_in(netns) as ipr:
        links = [
            link
            for link in ipr.get_links()
            if link.get("ifname") not in ("lo", TAP_NAME) and link.get("address")
        ]
        if not links:
            return None
        link = links[0]
        index = int(link["index"])
        addresses = tuple(
            Address(int(a["family"]), str(a.get("address")), int(a["prefixlen"]))
            for a in ipr.get_addr(index=index)
            if a.get("address") and _is_global(int(a["family"]), str(a.get("address")))
        )
        routes = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
                if r.get("oif") != index or r["proto"] == RTPROT_KERNEL:
                    continue  # the guest's kernel adds on-link routes with the addresses
                dst = str(r.get("dst") or "")
                if family == socket.AF_INET6 and dst.startswith("fe80"):
                    continue
                routes.append(Route(family, dst, int(r["dst_len"]), str(r.get("gateway") or "")))
        return PodNetwork(
            netns=netns,
            ifname=str(link.get("ifname")),
            index=index,
            mac=str(link.get("address")),
            mtu=int(link.get("mtu") or 1500),
            addresses=addresses,
            routes=tuple(routes),
        )


def redirect(net: PodNetwork, tap: str = TAP_NAME, timeout: float = 10.0) -> None:
    """Once qemu has created the tap: bring it up and join it to the CNI interface both ways."""
    with _ipr_in(net.netns) as ipr:
        deadline = time.monotonic() + timeout
        while not (found := ipr.link_lookup(ifname=tap)):
            if time.monotonic() > deadline:
                raise NetworkError(f"qemu did not create tap {tap} in {net.netns}")
            time.sleep(0.01)
        tap_index = int(found[0])
        ipr.link("set", index=tap_index, state="up", mtu=net.mtu)
        for src, dst in ((net.index, tap_index), (tap_index, net.index)):
            ipr.tc("add", "ingress", src, "ffff:")
            ipr.tc(
                "add-filter",
                "u32",
                src,
                parent=INGRESS,
                protocol=ETH_P_ALL,
                target=INGRESS | 1,
                keys=["0x0/0x0+0"],  # match every frame
                action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": dst},
            )


def unredirect(net: PodNetwork) -> None:
    """Take the filter off the CNI interface (the tap went with qemu).  Best effort: CRI may have
    removed the namespace already."""
    with contextlib.suppress(Exception), _ipr_in(net.netns) as ipr:
        ipr.tc("del", "ingress", net.index, "ffff:")
