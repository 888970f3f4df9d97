"""`hive peers ADDRESS`: who is in the DHT that ADDRESS belongs to."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from hivecli.cli import _output


def peers(
    address: Annotated[
        str,
        typer.Argument(help="Multiaddr of any peer in the DHT, e.g. /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW..."),
    ],
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout instead of a table.")
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to spend crawling the DHT.")] = 10.0,
    max_peers: Annotated[int, typer.Option("--max-peers", min=1, help="Stop after finding this many peers.")] = 1000,
) -> None:
    """List the peers of a DHT: peer ID, addresses, when they were last seen, our round trip.

    Starts a short-lived client node, asks ADDRESS for its routing table, then asks every peer found the same, until nobody names a new one (or --timeout). Exit code 3 if ADDRESS does not answer.
    """
    from hivecli.dht.crawl import crawl
    from hivecli.dht.dht import DHT
    from hivecli.net.multiaddr import parse_peer_maddr

    start = parse_peer_maddr(address)
    with DHT(client_mode=True, wait_timeout=min(3.0, timeout)) as client:
        found = client.run_coroutine(lambda _dht, node: crawl(node, start, max_peers=max_peers, timeout=timeout))
    if json_output:
        print(_to_json(found))
    else:
        _print_table(found)


def _row(info: Any) -> dict[str, Any]:
    return {
        "peer_id": str(info.peer_id),
        "maddrs": [str(m.with_peer_id(info.peer_id)) for m in info.maddrs],
        "last_seen_s": None if info.last_seen_s is None else round(info.last_seen_s, 3),
        "rtt_ms": None if info.rtt_ms is None else round(info.rtt_ms, 3),
        "reachable": info.reachable,
    }


def _to_json(found: list[Any]) -> str:
    import json

    return json.dumps({"peers": [_row(info) for info in found], "count": len(found)})


def _print_table(found: list[Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{len(found)} peers in the DHT")
    for column in ("peer id", "addresses", "last seen", "round trip", "reachable"):
        table.add_column(column, overflow="fold")  # never truncate: peer IDs and addresses get copied
    for info in found:
        row = _row(info)
        table.add_row(
            row["peer_id"],
            "\n".join(m.transport_address for m in info.maddrs) or "-",
            "-" if row["last_seen_s"] is None else f"{row['last_seen_s']:.1f} s ago",
            "-" if row["rtt_ms"] is None else f"{row['rtt_ms']:.1f} ms",
            {True: "yes", False: "no", None: "not asked"}[row["reachable"]],
        )
    _output.stdout.print(table)
