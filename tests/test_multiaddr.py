"""Multiaddr parsing, formatting and the errors for each kind of bad address."""

from __future__ import annotations

import re

import pytest

from hivecli._exceptions import ConfigError, MultiaddrError
from hivecli.net.identity import Identity
from hivecli.net.multiaddr import Multiaddr, parse_peer_maddr

PEER = Identity.generate().peer_id
PEER_TEXT = PEER.to_base58()


@pytest.mark.parametrize(
    ("text", "protocol", "host", "port"),
    [
        ("/ip4/127.0.0.1/tcp/4001", "ip4", "127.0.0.1", 4001),
        ("/ip4/0.0.0.0/tcp/0", "ip4", "0.0.0.0", 0),
        ("/ip4/203.0.113.5/tcp/65535", "ip4", "203.0.113.5", 65535),
        ("/ip6/::1/tcp/31337", "ip6", "::1", 31337),
        ("/ip6/2001:db8::5/tcp/80", "ip6", "2001:db8::5", 80),
        ("/dns4/example.com/tcp/443", "dns4", "example.com", 443),
        ("/dns6/node.example.org/tcp/1", "dns6", "node.example.org", 1),
        ("/dns/localhost/tcp/8080", "dns", "localhost", 8080),
    ],
)
@pytest.mark.parametrize("with_peer", [False, True], ids=["bare", "p2p"])
def test_round_trip(text: str, protocol: str, host: str, port: int, with_peer: bool) -> None:
    if with_peer:
        text += f"/p2p/{PEER_TEXT}"
    maddr = Multiaddr.parse(text)
    assert (maddr.protocol, maddr.host, maddr.port) == (protocol, host, port)
    assert maddr.peer_id == (PEER if with_peer else None)
    assert str(maddr) == text
    assert Multiaddr.parse(str(maddr)) == maddr


@pytest.mark.parametrize(
    ("text", "normalised_host"),
    [
        ("/ip6/0:0:0:0:0:0:0:1/tcp/5", "::1"),
        ("/ip6/2001:DB8:0:0:0:0:0:1/tcp/5", "2001:db8::1"),
        ("/ip6/2001:0db8:0000::0001/tcp/5", "2001:db8::1"),
        ("/ip6/::ffff:192.0.2.1/tcp/5", "::ffff:c000:201"),
    ],
)
def test_ip6_is_normalised(text: str, normalised_host: str) -> None:
    maddr = Multiaddr.parse(text)
    assert maddr.host == normalised_host
    assert str(maddr) == f"/ip6/{normalised_host}/tcp/5"
    # the normalised form parses back to an equal address
    assert Multiaddr.parse(str(maddr)) == maddr
    # two spellings of one address are the same Multiaddr (dataclass equality / hashing)
    assert Multiaddr.parse(f"/ip6/{normalised_host}/tcp/5") == maddr
    assert len({maddr, Multiaddr.parse(f"/ip6/{normalised_host}/tcp/5")}) == 1


def test_trailing_slash_and_surrounding_whitespace_are_tolerated() -> None:
    assert str(Multiaddr.parse("/ip4/10.0.0.1/tcp/7/")) == "/ip4/10.0.0.1/tcp/7"
    assert str(Multiaddr.parse("  /ip4/10.0.0.1/tcp/7\n")) == "/ip4/10.0.0.1/tcp/7"


def test_helpers_change_one_part() -> None:
    bare = Multiaddr.parse("/ip4/10.0.0.1/tcp/7")
    full = bare.with_peer_id(PEER)
    assert str(full) == f"/ip4/10.0.0.1/tcp/7/p2p/{PEER_TEXT}"
    assert full.without_peer_id() == bare
    assert str(bare.with_port(9)) == "/ip4/10.0.0.1/tcp/9"
    assert Multiaddr.parse("/ip4/0.0.0.0/tcp/1").is_unspecified
    assert Multiaddr.parse("/ip6/::/tcp/1").is_unspecified
    assert not bare.is_unspecified
    assert Multiaddr.parse("/ip4/127.0.0.1/tcp/1").is_loopback
    assert not Multiaddr.parse("/dns4/localhost/tcp/1").is_loopback  # names are not resolved


BAD_ADDRESSES = [
    # (text, fragment of the reason that must appear in the message)
    ("ip4/1.2.3.4/tcp/80", "must start with '/'"),
    ("", "must start with '/'"),
    ("1.2.3.4:80", "must start with '/'"),
    ("/ip4/256.1.1.1/tcp/80", "'256.1.1.1' is not an IPv4 address"),
    ("/ip4/1.2.3/tcp/80", "'1.2.3' is not an IPv4 address"),
    ("/ip4/::1/tcp/80", "'::1' is not an IPv4 address"),
    ("/ip4/example.com/tcp/80", "'example.com' is not an IPv4 address"),
    ("/ip6/1.2.3.4/tcp/80", "'1.2.3.4' is not an IPv6 address"),
    ("/ip6/2001:db8::g/tcp/80", "'2001:db8::g' is not an IPv6 address"),
    ("/dns4//tcp/80", "host name is empty"),
    ("/ip4/1.2.3.4/tcp/http", "port 'http' is not a number"),
    ("/ip4/1.2.3.4/tcp/65536", "port '65536' is not a number from 0 to 65535"),
    ("/ip4/1.2.3.4/tcp/-1", "port '-1' is not a number"),
    (f"/ip4/1.2.3.4/tcp//p2p/{PEER_TEXT}", "port '' is not a number"),
    ("/ip4/1.2.3.4/tcp/", "it has 3 components"),  # the trailing '/' is dropped, so no port is left
    ("/ip4/1.2.3.4/tcp/8O", "port '8O' is not a number"),
    ("/ip4/1.2.3.4/tcp/\u00b2", "is not a number"),  # '²'.isdigit() is True but int('²') fails
    ("/ip4/1.2.3.4/udp/80", "transport 'udp' is not supported"),
    ("/ip4/1.2.3.4/quic/80", "transport 'quic' is not supported"),
    ("/ip4/1.2.3.4/tcp", "it has 3 components"),
    ("/ip4/1.2.3.4", "it has 2 components"),
    ("/", "it has 0 components"),
    ("/ip4/1.2.3.4/tcp/80/p2p", "it has 5 components"),
    (f"/ip4/1.2.3.4/tcp/80/p2p/{PEER_TEXT}/extra", "a relayed address reads"),
    (f"/ip4/1.2.3.4/tcp/80/p2p/{PEER_TEXT}/p2p-circuit/p2p", "it has 8 components"),
    ("/ip4/1.2.3.4/tcp/80/p2p/QmNotAPeerId/p2p-circuit", "relay: 'QmNotAPeerId' is not a peer ID"),
    ("/unix/tmp/tcp/80", "'unix' is not a supported address protocol"),
    ("/http/example.com/tcp/80", "'http' is not a supported address protocol"),
    ("/IP4/1.2.3.4/tcp/80", "'IP4' is not a supported address protocol"),
    ("/ip4/1.2.3.4/tcp/80/ipfs/" + PEER_TEXT, "expected /p2p/PEER_ID after the port, got /ipfs"),
    ("/ip4/1.2.3.4/tcp/80/p2p/QmNotAPeerId", "'QmNotAPeerId' is not a peer ID"),
    ("/ip4/1.2.3.4/tcp/80/p2p/12D3KooW0OIl", "is not a base58 character"),
    ("/ip4/1.2.3.4/tcp/80/p2p/" + PEER_TEXT[:-1], "is not a peer ID"),
]


@pytest.mark.parametrize(("text", "reason"), BAD_ADDRESSES, ids=[t or "<empty>" for t, _ in BAD_ADDRESSES])
def test_bad_address_names_the_string_and_the_reason(text: str, reason: str) -> None:
    with pytest.raises(MultiaddrError) as info:
        Multiaddr.parse(text)
    message = str(info.value)
    assert repr(text) in message, message
    assert reason in message, message
    assert "\n" not in message  # one line
    assert isinstance(info.value, ConfigError)  # the CLI maps it to "bad input"


def test_non_string_is_rejected() -> None:
    with pytest.raises(MultiaddrError, match="not a multiaddr string"):
        Multiaddr.parse(None)  # type: ignore[arg-type]
    with pytest.raises(MultiaddrError, match="not a multiaddr string"):
        Multiaddr.parse(b"/ip4/1.2.3.4/tcp/1")  # type: ignore[arg-type]


def test_parse_peer_maddr_accepts_a_full_address() -> None:
    text = f"/ip4/198.51.100.7/tcp/4001/p2p/{PEER_TEXT}"
    maddr = parse_peer_maddr(text)
    assert maddr == Multiaddr.parse(text)
    assert maddr.peer_id == PEER
    assert parse_peer_maddr(maddr) is maddr  # an already parsed Multiaddr passes through


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("/ip4/198.51.100.7/tcp/4001", "has no /p2p/PEER_ID part"),
        ("/dns4/example.com/tcp/4001", "has no /p2p/PEER_ID part"),
        (f"/ip4/198.51.100.7/tcp/0/p2p/{PEER_TEXT}", "is a listen address"),
        (f"/ip4/0.0.0.0/tcp/4001/p2p/{PEER_TEXT}", "is a listen address"),
        (f"/ip6/::/tcp/4001/p2p/{PEER_TEXT}", "is a listen address"),
    ],
)
def test_parse_peer_maddr_rejects_addresses_it_cannot_dial(text: str, reason: str) -> None:
    with pytest.raises(MultiaddrError) as info:
        parse_peer_maddr(text)
    assert repr(text) in str(info.value)
    assert reason in str(info.value)
    # the same checks apply to an already parsed Multiaddr
    with pytest.raises(MultiaddrError, match=re.escape(reason)):
        parse_peer_maddr(Multiaddr.parse(text))


def test_parse_peer_maddr_propagates_syntax_errors() -> None:
    with pytest.raises(MultiaddrError, match=re.escape("'300.0.0.1' is not an IPv4 address")):
        parse_peer_maddr(f"/ip4/300.0.0.1/tcp/1/p2p/{PEER_TEXT}")


def test_circuit_address_round_trips_and_names_its_relay() -> None:
    relay, peer = Identity.generate().peer_id, Identity.generate().peer_id
    text = f"/ip4/203.0.113.5/tcp/31337/p2p/{relay}/p2p-circuit/p2p/{peer}"
    maddr = Multiaddr.parse(text)
    assert (maddr.relay, maddr.peer_id, maddr.host, maddr.port) == (relay, peer, "203.0.113.5", 31337)
    assert str(maddr) == text
    assert maddr.transport_address == f"/ip4/203.0.113.5/tcp/31337/p2p/{relay}/p2p-circuit"
    assert maddr.relay_maddr == Multiaddr.parse(f"/ip4/203.0.113.5/tcp/31337/p2p/{relay}")
    # what the DHT passes around (transport_address) parses back to the circuit, ready for our /p2p part
    assert Multiaddr.parse(maddr.transport_address).with_peer_id(peer) == maddr
    assert Multiaddr.parse("/ip4/203.0.113.5/tcp/31337").via(relay).with_peer_id(peer) == maddr
    assert parse_peer_maddr(text) == maddr
