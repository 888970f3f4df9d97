"""`hive dht`: a standalone DHT node, the bootstrap point of a swarm."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer

from hivecli.cli import _output
from hivecli.cli._network import (
    AnnounceOption,
    ClientModeOption,
    HostOption,
    IdentityOption,
    InitialPeersOption,
    PortOption,
    SwarmKeyOption,
    announce_maddrs,
    describe_reachability,
    listen_maddr,
    net_settings,
    print_reachability,
    reachability_json,
    split_peer_list,
)
from hivecli.cli._signals import stop_on_signals

logger = logging.getLogger("hivecli.cli.dht")


def dht(
    host: HostOption = "0.0.0.0",
    port: PortOption = 0,
    announce: AnnounceOption = None,
    client_mode: ClientModeOption = False,
    relay: Annotated[
        bool, typer.Option("--relay/--no-relay", help="Relay for peers behind NAT while this node is reachable.")
    ] = True,
    initial_peers: InitialPeersOption = None,
    identity: IdentityOption = None,
    swarm_key: SwarmKeyOption = None,
    refresh_period: Annotated[
        float,
        typer.Option("--refresh-period", min=0.1, help="Seconds between maintenance passes and status lines."),
    ] = 30.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON lines on stdout instead of text.")] = False,
) -> None:
    """Run a standalone DHT node that other peers join through.

    Prints every address it can be reached at and the line to paste on other machines, then logs the routing-table size every --refresh-period seconds until Ctrl+C (exit 130) or SIGTERM (exit 0).
    """
    from hivecli.dht.dht import DHT

    peers = split_peer_list(initial_peers)
    node = DHT(
        initial_peers=peers,
        host_maddrs=[listen_maddr(host, port)],
        announce_maddrs=announce_maddrs(announce, port),
        identity_path=identity,
        net_settings=net_settings(swarm_key, relay=relay),
        client_mode=client_mode,
        check_reachability=not client_mode,
        refresh_period=refresh_period,
    )
    with stop_on_signals() as stop:
        try:
            node.run_in_background(await_ready=True)
            reachability, maddrs, join = describe_reachability(node)
            if json_output:
                _output.emit_json(
                    "listening", peer_id=str(node.peer_id), maddrs=maddrs, join=join,
                    reachability=reachability_json(node, reachability),
                )  # fmt: skip
            else:
                _print_banner(str(node.peer_id), maddrs, reachability, join)
            while not stop.wait(refresh_period):
                table, keys = node.run_coroutine(_status)
                if json_output:
                    _output.emit_json("status", routing_table_size=table, stored_keys=keys)
                logger.info(
                    "%d DHT nodes (including this one) are in the local routing table; local storage holds %d keys",
                    table + 1,
                    keys,
                )
        finally:
            node.shutdown()
    if json_output:
        _output.emit_json("stopped", exit_code=stop.exit_code)
    raise typer.Exit(stop.exit_code)


async def _status(_dht: Any, node: Any) -> tuple[int, int]:
    return len(node.protocol.routing_table), len(node.protocol.storage)


def _print_banner(peer_id: str, maddrs: list[str], reachability: str, join: list[str]) -> None:
    out = _output.stdout
    print_reachability(out, f"DHT node [bold]{peer_id}[/bold] is running. Visible addresses:", maddrs, reachability)
    if not join:
        return
    out.print("To join from another machine, run:" if join == maddrs else "To join, go through its relay:")
    out.print(f"  hive dht --initial-peers {join[0]}")
    out.print(f'or, in Python: hivecli.DHT(initial_peers=["{join[0]}"], start=True)')
