"""Multiaddrs in the subset hive speaks: `/ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT[/p2p/PEER_ID]`.

A peer's full address is e.g. `/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW...`; a listen address
leaves out `/p2p/...`. A peer that others cannot dial (behind NAT) is reached through a relay:
`/ip4/RELAY_HOST/tcp/PORT/p2p/RELAY_ID/p2p-circuit/p2p/PEER_ID` (libp2p's circuit notation; see
hivecli.net.relay). Parsing errors say which part of which string is wrong.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field

from hivecli._exceptions import MultiaddrError
from hivecli.net.identity import PeerID

_HOST_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")
_EXAMPLE = "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW..."


@dataclass(frozen=True)
class Multiaddr:
    """A parsed multiaddr. `peer_id` is None for a bare listen address."""

    protocol: str  # one of ip4, ip6, dns, dns4, dns6
    host: str
    port: int
    peer_id: PeerID | None = None
    relay: PeerID | None = None  # set for a circuit address: dial `relay` at host:port, then ask it for peer_id
    # formatted text, cached: DHT answers carry many addresses and the same ones recur
    _base: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        base = f"/{self.protocol}/{self.host}/tcp/{self.port}"
        if self.relay is not None:
            base += f"/p2p/{self.relay.to_base58()}/p2p-circuit"
        object.__setattr__(self, "_base", base)

    @classmethod
    def parse(cls, text: str) -> Multiaddr:
        """Parse a multiaddr string.

        Raises:
            MultiaddrError: one line naming the string and what is wrong with it.
        """
        if not isinstance(text, str):
            raise MultiaddrError(f"{text!r} is not a multiaddr string; expected e.g. {_EXAMPLE}")
        return _parse_cached(text)

    @classmethod
    def _parse(cls, text: str) -> Multiaddr:
        if not isinstance(text, str):
            raise MultiaddrError(f"{text!r} is not a multiaddr string; expected e.g. {_EXAMPLE}")

        def fail(reason: str) -> MultiaddrError:
            return MultiaddrError(f"{text!r} is not a valid multiaddr: {reason}; expected e.g. {_EXAMPLE}")

        stripped = text.strip()
        if not stripped.startswith("/"):
            raise fail("it must start with '/'")
        parts = stripped.rstrip("/").split("/")[1:]
        relay = None
        if len(parts) in (7, 9):  # .../p2p/RELAY_ID/p2p-circuit[/p2p/PEER_ID]
            if parts[4] != "p2p" or parts[6] != "p2p-circuit":
                raise fail("a relayed address reads /PROTO/HOST/tcp/PORT/p2p/RELAY_ID/p2p-circuit[/p2p/PEER_ID]")
            try:
                relay = PeerID.from_base58(parts[5])
            except ValueError as e:
                raise fail(f"relay: {e}") from None
            parts = parts[:4] + parts[7:]
        if len(parts) not in (4, 6):
            raise fail(f"it has {len(parts)} components, expected /PROTO/HOST/tcp/PORT[/p2p/PEER_ID]")
        protocol, host, transport, port_text = parts[:4]
        if protocol not in _HOST_PROTOCOLS:
            raise fail(f"{protocol!r} is not a supported address protocol (use one of {', '.join(_HOST_PROTOCOLS)})")
        if protocol == "ip4":
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise fail(f"{host!r} is not an IPv4 address") from None
        elif protocol == "ip6":
            try:
                host = str(ipaddress.IPv6Address(host))
            except ValueError:
                raise fail(f"{host!r} is not an IPv6 address") from None
        elif not host:
            raise fail("the host name is empty")
        if transport != "tcp":
            raise fail(f"transport {transport!r} is not supported (hive speaks tcp)")
        if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
            raise fail(f"port {port_text!r} is not a number from 0 to 65535")
        peer_id = None
        if len(parts) == 6:
            if parts[4] != "p2p":
                raise fail(f"expected /p2p/PEER_ID after the port, got /{parts[4]}")
            try:
                peer_id = PeerID.from_base58(parts[5])
            except ValueError as e:
                raise fail(str(e)) from None
        return cls(protocol, host, int(port_text), peer_id, relay)

    def with_peer_id(self, peer_id: PeerID | None) -> Multiaddr:
        return Multiaddr(self.protocol, self.host, self.port, peer_id, self.relay)

    def without_peer_id(self) -> Multiaddr:
        return self.with_peer_id(None)

    def with_port(self, port: int) -> Multiaddr:
        return Multiaddr(self.protocol, self.host, port, self.peer_id, self.relay)

    def via(self, relay: PeerID) -> Multiaddr:
        """This relay's address (host, port) turned into a circuit address through it."""
        return Multiaddr(self.protocol, self.host, self.port, None, relay)

    @property
    def relay_maddr(self) -> Multiaddr:
        """For a circuit address: the relay's own address, with /p2p/RELAY_ID."""
        assert self.relay is not None, "not a circuit address"
        return Multiaddr(self.protocol, self.host, self.port, self.relay)

    @property
    def is_unspecified(self) -> bool:
        """True for 0.0.0.0 / :: (listen on every interface)."""
        return self.protocol in ("ip4", "ip6") and ipaddress.ip_address(self.host).is_unspecified

    @property
    def is_loopback(self) -> bool:
        return self.protocol in ("ip4", "ip6") and ipaddress.ip_address(self.host).is_loopback

    @property
    def transport_address(self) -> str:
        """The address without its final /p2p part, e.g. /ip4/1.2.3.4/tcp/5 (a circuit address
        keeps its relay: /ip4/1.2.3.4/tcp/5/p2p/RELAY/p2p-circuit)."""
        return self._base

    def __str__(self) -> str:
        if self.peer_id is None:
            return self._base
        return f"{self._base}/p2p/{self.peer_id.to_base58()}"


@functools.lru_cache(maxsize=8192)
def _parse_cached(text: str) -> Multiaddr:
    # Multiaddr is immutable, so one parsed instance can serve every caller; errors are not cached
    return Multiaddr._parse(text)


def parse_peer_maddr(text: str | Multiaddr) -> Multiaddr:
    """Parse an address to dial, which must name the peer (`/p2p/...`) and a real port.

    Raises:
        MultiaddrError: the address is malformed, lacks `/p2p/PEER_ID`, or has port 0.
    """
    maddr = text if isinstance(text, Multiaddr) else Multiaddr.parse(text)
    if maddr.peer_id is None:
        raise MultiaddrError(
            f"{str(text)!r} has no /p2p/PEER_ID part, so we cannot check who answers; "
            f"copy the full address the peer printed, e.g. {_EXAMPLE}"
        )
    if maddr.port == 0 or maddr.is_unspecified:
        raise MultiaddrError(
            f"{str(text)!r} is a listen address (port 0 or unspecified host), not one to dial; "
            f"use an address the peer printed as visible"
        )
    return maddr
