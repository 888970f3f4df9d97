"""Network flags shared by every command that runs a peer (`hive dht` now; start/join/local later)."""

from __future__ import annotations

import ipaddress
import os
from typing import Annotated

import typer

from hivecli._exceptions import ConfigError
from hivecli.net.connection import NetSettings
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


def net_settings(swarm_key: str | None) -> NetSettings:
    """Network settings for a node started from the command line: encrypted links, and the
    private swarm of `swarm_key` (a file path) if given.

    Raises:
        ConfigError: the swarm key file is missing or malformed (the message names it and the fix).
    """
    if swarm_key == "" or (swarm_key is None and os.environ.get("HIVE_SWARM_KEY", "x").strip() == ""):
        raise ConfigError(
            "--swarm-key (or HIVE_SWARM_KEY) is set but empty, which usually means an unset variable in a script; "
            "name the key file (`hive keygen` creates one), or unset it for a public swarm"
        )
    if swarm_key is None:
        return NetSettings()
    return NetSettings(security=SecuritySettings(swarm_key=load_swarm_key(swarm_key)))
