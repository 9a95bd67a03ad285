"""The guest's interface set up for its pod over rtnetlink, in the agent's own process.

A clone of a VM template must get the pod's MAC, MTU, addresses and routes at every start; as
``ip`` commands that was one busybox process each, some 30 ms apiece under TCG, most of what
``setup`` cost.  These are the few rtnetlink requests ``ip`` itself sends: messages are built by
pure functions (:func:`set_link`, :func:`add_address`, :func:`replace_route`), and
:func:`apply` sends them on one socket, each acknowledged before the next.

Standard library only: the agent runs without site-packages (the host uses pyroute2).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

# <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h>, <linux/if_addr.h>
NLMSG_ERROR = 2
RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
IFLA_ADDRESS = 1
IFLA_MTU = 4
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1

_HEADER = struct.Struct("=IHHII")  # nlmsghdr
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg
_RTATTR = struct.Struct("=HH")


class NetlinkError(OSError):
    pass


@dataclass(frozen=True)
class Address:
    address: str
    prefixlen: int


@dataclass(frozen=True)
class Route:
    dst: str  # "" for the default route
    dst_len: int
    gateway: str  # "" for an on-link route
    version: int = 4  # of the default route, which has no address to tell


def _attr(kind: int, data: bytes) -> bytes:
    raw = _RTATTR.pack(_RTATTR.size + len(data), kind) + data
    return raw + b"\0" * (-len(raw) % 4)


def _message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return _HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, seq, 0) + body


def _ip(text: str) -> tuple[int, bytes]:  # (address family, packed)
    ip = ipaddress.ip_address(text)
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), ip.packed


def set_link(seq: int, index: int, *, up: bool, mac: str = "", mtu: int = 0) -> bytes:
    """``ip link set <index> [address <mac>] [mtu <mtu>] up|down``."""
    attrs = b""
    if mac:
        attrs += _attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))
    if mtu:
        attrs += _attr(IFLA_MTU, struct.pack("=I", mtu))
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP) + attrs
    return _message(RTM_NEWLINK, 0, seq, body)


def add_address(seq: int, index: int, addr: Address) -> bytes:
    """``ip addr add <address>/<prefixlen> dev <index>``."""
    family, packed = _ip(addr.address)
    body = _IFADDR.pack(family, addr.prefixlen, 0, RT_SCOPE_UNIVERSE, index)
    body += _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
    return _message(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, seq, body)


def replace_route(seq: int, index: int, route: Route) -> bytes:
    """``ip route replace <dst>/<len>|default [via <gateway>] dev <index>``."""
    family: int = socket.AF_INET6 if route.version == 6 else socket.AF_INET
    if route.dst:
        family, dst = _ip(route.dst)
    else:
        dst = b""
    gateway = _ip(route.gateway)[1] if route.gateway else b""
    scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
    dst_len = route.dst_len if dst else 0
    body = _RTMSG.pack(family, dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0)
    if dst:
        body += _attr(RTA_DST, dst)
    if gateway:
        body += _attr(RTA_GATEWAY, gateway)
    body += _attr(RTA_OIF, struct.pack("=i", index))
    return _message(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, seq, body)


def ack_error(reply: bytes, seq: int) -> int | None:
    """The errno of the acknowledgement for ``seq`` in ``reply`` (0: done), None if absent."""
    offset = 0
    while offset + _HEADER.size <= len(reply):
        length, kind, _flags, got_seq, _pid = _HEADER.unpack_from(reply, offset)
        if length < _HEADER.size:
            break
        if kind == NLMSG_ERROR and got_seq == seq:
            (code,) = struct.unpack_from("=i", reply, offset + _HEADER.size)
            return -int(code)
        offset += (length + 3) & ~3
    return None


def setup_messages(
    index: int, *, mac: str, mtu: int, addresses: Iterable[Address], routes: Iterable[Route], up: bool = True
) -> list[tuple[str, bytes]]:
    """What ``setup`` sends, in order, each with what it does (for the error): the MAC while
    the link is down, then MTU and up, addresses, on-link routes before those through gateways."""
    out: list[tuple[str, bytes]] = []  # sequence numbers count from 1
    if mac:
        out.append((f"link address {mac}", set_link(len(out) + 1, index, up=False, mac=mac)))
    if not up:
        return out
    out.append((f"link up mtu {mtu}", set_link(len(out) + 1, index, up=True, mtu=mtu)))
    for a in addresses:
        out.append((f"addr add {a.address}/{a.prefixlen}", add_address(len(out) + 1, index, a)))
    for r in sorted(routes, key=lambda r: bool(r.gateway)):
        dst = f"{r.dst}/{r.dst_len}" if r.dst else "default"
        via = f" via {r.gateway}" if r.gateway else ""
        out.append((f"route replace {dst}{via}", replace_route(len(out) + 1, index, r)))
    return out


def apply(messages: list[tuple[str, bytes]]) -> None:
    """Send each message and wait for its acknowledgement; the first refusal is a NetlinkError
    naming the request."""
    kind = socket.SOCK_RAW | socket.SOCK_CLOEXEC
    with socket.socket(socket.AF_NETLINK, kind, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        for what, msg in messages:
            _len, kind, _flags, seq, _pid = _HEADER.unpack_from(msg)
            sock.send(msg)
            while (code := ack_error(sock.recv(65536), seq)) is None:
                pass
            if code == errno.EEXIST and kind == RTM_NEWADDR:
                continue  # already there (a set-up retried): as wanted
            if code:
                raise NetlinkError(code, f"{what}: {os.strerror(code)}")
