"""Network flags shared by every command that runs a peer (`hive dht`, `hive start`, `hive join`)."""

from __future__ import annotations

import ipaddress
import os
from typing import Annotated, Any

import typer

from hivecli._exceptions import ConfigError
from hivecli.net.connection import NetSettings
from hivecli.net.relay import RelaySettings
from hivecli.net.secure import SecuritySettings, load_swarm_key

HostOption = Annotated[
    str,
    typer.Option("--host", help="IP address to listen on; 0.0.0.0 means every IPv4 interface, :: every IPv6 one."),
]
PortOption = Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port to listen on; 0 picks a free one.")]
AnnounceOption = Annotated[
    list[str] | None,
    typer.Option(
        "--announce",
        help="Address to tell other peers instead of the detected ones (repeatable): a multiaddr, "
        "or IP[:PORT] (the port defaults to the one we listen on). Use it behind port forwarding.",
    ),
]
InitialPeersOption = Annotated[
    list[str] | None,
    typer.Option(
        "--initial-peers",
        envvar="HIVE_INITIAL_PEERS",
        help="Multiaddr of a peer already in the DHT (repeatable; the env var takes a space-separated list).",
    ),
]
SwarmKeyOption = Annotated[
    str | None,
    typer.Option(
        "--swarm-key",
        envvar="HIVE_SWARM_KEY",
        help="A private swarm's key file (`hive keygen`): only peers holding the same key can connect.",
    ),
]
ClientModeOption = Annotated[
    bool,
    typer.Option(
        "--client-mode",
        help="Accept no connections (behind NAT): only dial out. By default the peer asks others to dial it "
        "back and, if they cannot, becomes reachable through a relay or runs as a client by itself.",
    ),
]
IdentityOption = Annotated[
    str | None,
    typer.Option("--identity", help="File with this peer's private key, created if missing; keeps the peer ID stable."),
]


def listen_maddr(host: str, port: int) -> str:
    """The listen multiaddr for --host/--port. Raises ConfigError for a host that is not an IP."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"--host {host!r} is not an IP address; use e.g. 0.0.0.0, 127.0.0.1 or ::") from None
    return f"/ip{ip.version}/{ip}/tcp/{port}"


def announce_maddrs(values: list[str] | None, port: int) -> list[str]:
    """Expand --announce shorthands (IP or IP:PORT) to multiaddrs."""
    result = []
    for value in values or []:
        if value.startswith("/"):
            result.append(value)
            continue
        host, _, port_text = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
        announce_port = int(port_text) if port_text.isdigit() else port
        if announce_port == 0:
            raise ConfigError(f"--announce {value!r} needs a port when --port is 0; write IP:PORT or fix --port")
        result.append(listen_maddr(host, announce_port))
    return result


def split_peer_list(values: list[str] | None) -> list[str]:
    """Flatten --initial-peers values; an env var may hold several space- or comma-separated ones.

    Raises:
        ConfigError: a value was given but is blank (usually an unset variable in a script).
    """
    if not values and os.environ.get("HIVE_INITIAL_PEERS", "x").strip() == "":
        raise ConfigError(
            "HIVE_INITIAL_PEERS is set but empty, which usually means an unset variable in a script; "
            "put the multiaddr another peer printed in it, or unset it to start a new DHT"
        )
    peers: list[str] = []
    for value in values or []:
        parts = value.replace(",", " ").split()
        if not parts:
            raise ConfigError(
                "--initial-peers (or HIVE_INITIAL_PEERS) was given an empty value, which usually means an "
                "unset variable; pass the multiaddr another peer printed, or leave the flag out to start a new DHT"
            )
        peers.extend(parts)
    return peers


_YES, _NO = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _encrypt_same_host() -> bool:
    """HIVE_ENCRYPT_SAME_HOST: whether to seal links to peers on this host too (security.md).

    Raises:
        ConfigError: a value that is neither yes nor no.
    """
    value = os.environ.get("HIVE_ENCRYPT_SAME_HOST", "").strip().lower()
    if value not in _YES + _NO:
        raise ConfigError(
            f"HIVE_ENCRYPT_SAME_HOST={value!r} is neither yes nor no; set it to 1 to seal links between "
            f"peers on this host too, or unset it"
        )
    return value in _YES


def net_settings(swarm_key: str | None, relay: bool = True) -> NetSettings:
    """Network settings for a node started from the command line: encrypted links (also to peers
    on this host with HIVE_ENCRYPT_SAME_HOST=1), the private swarm of `swarm_key` (a file path)
    if given, and relaying for NATed peers unless `relay` is off.

    Raises:
        ConfigError: the swarm key file is missing or malformed, or HIVE_ENCRYPT_SAME_HOST is not
            yes or no (the message names the value and the fix).
    """
    if swarm_key == "" or (swarm_key is None and os.environ.get("HIVE_SWARM_KEY", "x").strip() == ""):
        raise ConfigError(
            "--swarm-key (or HIVE_SWARM_KEY) is set but empty, which usually means an unset variable in a script; "
            "name the key file (`hive keygen` creates one), or unset it for a public swarm"
        )
    relays = RelaySettings(serve=None if relay else False)
    key = None if swarm_key is None else load_swarm_key(swarm_key)
    security = SecuritySettings(swarm_key=key, encrypt_same_host=_encrypt_same_host())
    return NetSettings(security=security, relay=relays)


def describe_reachability(dht: Any) -> tuple[str, list[str], list[str]]:
    """What to tell the user about reaching this peer: (one paragraph on whether others can and
    what to do, the addresses others can reach it at, reachable ones first, and the addresses to
    put in a join line). A peer others cannot dial does not serve the DHT, so others join through
    its relay instead; with no relay, there is nothing to put in a join line."""
    from hivecli.net.reachability import UNKNOWN, UNREACHABLE, advice

    visible = dht.get_visible_maddrs()
    maddrs = [str(m) for m in visible]
    report = dht.reachability
    if dht.node.requested_client_mode:
        return "Running as a client (--client-mode): other peers do not open connections to this one.", [], []
    port = next((m.port for m in dht.node.host.listen_maddrs if m.port), None)
    if report.status == UNKNOWN:
        text = "Whether other machines can reach this peer is checked when another peer joins (dial-back)."
        return text, maddrs, maddrs
    text = advice(report, port, relayed=dht.relayed)
    if report.status != UNREACHABLE:
        return text, maddrs, maddrs
    relays = [str(m.relay_maddr) for m in visible if m.relay is not None]
    return text, maddrs if relays else [], relays


def print_reachability(out: Any, title: str, maddrs: list[str], reachability: str) -> None:
    """The lines every command that starts a peer prints: its addresses under `title` (or that
    it has none others can reach), then the reachability paragraph."""
    if maddrs:
        out.print(title)
        for maddr in maddrs:
            out.print(f"  {maddr}", markup=False)
    else:
        out.print("No address of this peer can be reached from other machines.")
    out.print(reachability, markup=False)


def reachability_json(dht: Any, advice: str) -> dict[str, Any]:
    """The "reachability" field of a command's "listening" JSON event."""
    return dht.reachability.to_json() | {"relayed": dht.relayed, "advice": advice}
