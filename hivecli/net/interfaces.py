"""Which addresses other peers can reach us at.

A node bound to 0.0.0.0 (or ::) is reachable at every address of every interface that is up;
printing only one of them (or the hostname's, often 127.0.1.1) is a classic source of
"cannot connect" reports, so we list them all, the most widely reachable first.
"""

from __future__ import annotations

import ipaddress
import socket

from hivecli.net.multiaddr import Multiaddr


def _rank(address: str) -> int:
    ip = ipaddress.ip_address(address)
    if ip.is_loopback:
        return 2
    if ip.is_private:
        return 1
    return 0


def interface_addresses(family: int) -> list[str]:
    """Addresses of the interfaces that are up, public first, then private, then loopback.

    IPv6 link-local addresses are left out: they need a zone (scope id) to be dialed.
    """
    import psutil  # imported here: only nodes that listen on every interface need it

    stats = psutil.net_if_stats()
    found: list[str] = []
    for name, addrs in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        for addr in addrs:
            if addr.family != family:
                continue
            host = addr.address.split("%", 1)[0]
            if family == socket.AF_INET6 and ipaddress.IPv6Address(host).is_link_local:
                continue
            if host not in found:
                found.append(host)
    return sorted(found, key=_rank)


def expand_unspecified(bound: list[Multiaddr]) -> list[Multiaddr]:
    """Replace each 0.0.0.0 / :: listen address by one address per interface, same port."""
    visible: list[Multiaddr] = []
    for maddr in bound:
        if not maddr.is_unspecified:
            candidates = [maddr]
        else:
            family = socket.AF_INET if maddr.protocol == "ip4" else socket.AF_INET6
            candidates = [
                Multiaddr(maddr.protocol, host, maddr.port, maddr.peer_id) for host in interface_addresses(family)
            ]
        visible.extend(m for m in candidates if m not in visible)
    return sorted(visible, key=lambda m: _rank(m.host) if m.protocol in ("ip4", "ip6") else 0)
