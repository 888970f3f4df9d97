"""Which addresses other peers can reach us at.

A node bound to 0.0.0.0 (or ::) is reachable at every address of every interface that is up;
printing only one of them (or the hostname's, often 127.0.1.1) is a classic source of
"cannot connect" reports, so we list them all, the most widely reachable first.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING, Any

from hivecli.net.multiaddr import Multiaddr

if TYPE_CHECKING:
    from hivecli.net.reachability import ReachabilityReport

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
    found: list[str] = []
    for addr in _addresses_of_interfaces_up():
        host = addr.address.split("%", 1)[0]
        if addr.family != family or (family == socket.AF_INET6 and ipaddress.IPv6Address(host).is_link_local):
            continue
        if host not in found:
            found.append(host)
    return sorted(found, key=_rank)


def _addresses_of_interfaces_up() -> list[Any]:
    """psutil's address entries (family, address, netmask) of every interface that is up."""
    import psutil  # imported here: only nodes that listen on every interface need it

    stats = psutil.net_if_stats()
    return [
        addr for name, addrs in psutil.net_if_addrs().items() if name not in stats or stats[name].isup for addr in addrs
    ]


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


def local_networks() -> list[Network]:
    """The networks (address and netmask) of this machine's interfaces that are up: a peer in
    one of them can dial our address there directly, NAT or not."""
    networks: list[Network] = []
    for addr in _addresses_of_interfaces_up():
        if addr.family not in (socket.AF_INET, socket.AF_INET6) or not addr.netmask:
            continue
        try:
            networks.append(ipaddress.ip_network(f"{addr.address.split('%', 1)[0]}/{addr.netmask}", strict=False))
        except ValueError:
            continue
    return networks


def select_addresses(
    direct: list[Multiaddr],
    circuits: list[Multiaddr],
    reachability: ReachabilityReport,
    remote_host: str | None,
    networks: list[Network],
) -> list[Multiaddr]:
    """Which of our addresses to give to the peer at `remote_host` (None: to anyone).

    * Loopback only to a peer on this machine (or to anyone when it is all we have: a swarm on
      one machine).
    * Private addresses not to a peer with a public address, which cannot route to them.
    * Once a dial-back found our direct addresses unreachable, they go only to peers on the
      same network as the address (a LAN neighbour can still dial it) and to this machine;
      everyone else gets the circuit addresses through our relays.
    * Addresses a dial-back confirmed come first, circuits last.
    """
    remote = _ip_or_none(remote_host)
    unreachable = reachability.status == "unreachable"

    def usable(maddr: Multiaddr) -> bool:
        host = _ip_or_none(maddr.host)
        if host is None:  # a DNS name: the user announced it, so it is meant for everyone
            return not unreachable
        if remote is None:
            return not host.is_loopback and not (unreachable and circuits)
        if remote.is_loopback:
            return True
        if host.is_loopback:
            return False
        if unreachable:
            return any(host in net and remote in net for net in networks)
        return host.is_global or not remote.is_global  # a peer on the internet cannot route to 10.x

    confirmed = set(reachability.reachable)
    chosen = sorted((m for m in direct if usable(m)), key=lambda m: m not in confirmed)
    if remote is None and not chosen and not circuits:
        chosen = list(direct)  # all loopback (a swarm on one machine), or nothing reachable and no relay yet
    return chosen + [m for m in circuits if m not in chosen]


def _ip_or_none(host: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if host is None:
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
