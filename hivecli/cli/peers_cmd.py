"""`hive peers ADDRESS`: who is in the DHT that ADDRESS belongs to, and which runs train there."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from hivecli.cli import _output
from hivecli.cli._network import SwarmKeyOption, net_settings


def peers(
    address: Annotated[
        str,
        typer.Argument(help="Multiaddr of any peer in the DHT, e.g. /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW..."),
    ],
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout (one per refresh) instead of tables.")
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to spend crawling the DHT.")] = 10.0,
    max_peers: Annotated[int, typer.Option("--max-peers", min=1, help="Stop after finding this many peers.")] = 1000,
    run: Annotated[
        str | None, typer.Option("--run", help="Show only this run's peers and their training progress.")
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh every --interval seconds until Ctrl+C.")] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.5, help="Seconds between refreshes with --watch.")
    ] = 2.0,
    swarm_key: SwarmKeyOption = None,
) -> None:
    """List the peers of a DHT and the training runs in it.

    Without --run: every DHT peer (peer ID, addresses, last seen, our round trip) and one line per run. With --run PREFIX: that run's peers with their step, loss, samples/s, test accuracy and last report. Warns on stderr when a run has fewer peers than its group size. Exit code 3 if ADDRESS does not answer.
    """
    from hivecli.dht.crawl import crawl
    from hivecli.dht.dht import DHT
    from hivecli.net.multiaddr import parse_peer_maddr
    from hivecli.runs import run_views

    start = parse_peer_maddr(address)
    with DHT(client_mode=True, wait_timeout=min(3.0, timeout), net_settings=net_settings(swarm_key)) as client:
        found = client.run_coroutine(lambda _dht, node: crawl(node, start, max_peers=max_peers, timeout=timeout))
        client.run_coroutine(lambda _dht, node: node.bootstrap([start]))  # reads of run records need a routing table
        while True:
            runs = run_views(client, run)
            if json_output:
                print(_to_json([] if run else found, runs), flush=True)
            else:
                _print_tables([] if run else found, runs, show_peers=run is None)
            _warn_small_runs(runs)
            if not watch:
                break
            time.sleep(interval)
            if not run:
                found = client.run_coroutine(
                    lambda _dht, node: crawl(node, start, max_peers=max_peers, timeout=timeout)
                )


def _describe_epoch(epoch: dict[str, Any]) -> str:
    """e.g. "epoch 12, 640/1,024 samples toward the next, ETA 3 s"."""
    unit, name = ("inner steps", "outer step") if epoch["mode"] == "diloco" else ("samples", "epoch")
    text = f"{name} {epoch['epoch']}, {epoch['progress']:,}/{epoch['target']:,} {unit} toward the next"
    return text + (f", ETA {epoch['eta_s']:.0f} s" if epoch["eta_s"] is not None else "")


def _warn_small_runs(runs: dict[str, dict[str, Any]]) -> None:
    for prefix, info in runs.items():
        target = info["summary"].get("target_group_size")
        count = len(info["peers"])
        if count == 0:
            _output.stderr.print(f"warning: run {prefix!r} has no peer reporting progress", markup=False)
        elif isinstance(target, int) and count < target:
            _output.stderr.print(
                f"warning: run {prefix!r} has {count} peer{'s' if count != 1 else ''}, fewer than its group size "
                f"{target}: groups form after min_matchmaking_time with whoever is there",
                markup=False,
            )


def _row(info: Any) -> dict[str, Any]:
    return {
        "peer_id": str(info.peer_id),
        "maddrs": [str(m.with_peer_id(info.peer_id)) for m in info.maddrs],
        "last_seen_s": None if info.last_seen_s is None else round(info.last_seen_s, 3),
        "rtt_ms": None if info.rtt_ms is None else round(info.rtt_ms, 3),
        "reachable": info.reachable,
        "reachability": info.net.get("reachability") if info.net else None,
        "relays": [str(p) for p in info.net.get("relays", [])] if info.net else [],
        "relay": info.net.get("relay") if info.net else None,
    }


def _relay_column(row: dict[str, Any]) -> str:
    """e.g. "via 12D3…abcd" for a peer reached through a relay; "relays 2 peers, 3.1 MB" for a relay."""
    parts = [f"via {relay[:6]}…{relay[-4:]}" for relay in row["relays"]]
    relay = row["relay"] or {}
    if relay.get("reservations") or relay.get("bytes"):
        parts.append(f"relays {_plural(relay.get('reservations', 0), 'peer')}, {relay.get('bytes', 0) / 1e6:.1f} MB")
    if row["reachability"] == "unreachable" and not row["relays"]:
        parts.append("unreachable (client)")
    return "\n".join(parts) or "-"


def _to_json(found: list[Any], runs: dict[str, dict[str, Any]]) -> str:
    import json

    return json.dumps({"peers": [_row(info) for info in found], "count": len(found), "runs": runs}, default=str)


def _print_tables(found: list[Any], runs: dict[str, dict[str, Any]], show_peers: bool) -> None:
    from rich.table import Table
    from rich.text import Text

    if show_peers:
        table = Table(title=f"{_plural(len(found), 'peer')} in the DHT")
        for column in ("peer id", "addresses", "last seen", "round trip", "reachable", "relay"):
            table.add_column(column, overflow="fold")  # never truncate: peer IDs and addresses get copied
        for info in found:
            row = _row(info)
            table.add_row(
                row["peer_id"],
                "\n".join(m.transport_address for m in info.maddrs) or "-",
                "-" if row["last_seen_s"] is None else f"{row['last_seen_s']:.1f} s ago",
                "-" if row["rtt_ms"] is None else f"{row['rtt_ms']:.1f} ms",
                {True: "yes", False: "no", None: "not asked"}[row["reachable"]],
                _relay_column(row),
            )
        _output.stdout.print(table)
    for prefix, info in runs.items():
        s = info["summary"]
        title = f"run {prefix}: {_plural(len(info['peers']), 'peer')}"
        if s:
            title += f" (model {s.get('model')}, data {s.get('dataset')}, group size {s.get('target_group_size')})"
        if info.get("epoch"):
            title += f"; {_describe_epoch(info['epoch'])}"
        table = Table(title=Text(title))  # Text, never markup: every string here comes from the DHT
        for column in ("peer id", "addresses", "step", "loss", "samples/s", "test accuracy", "last report"):
            table.add_column(column, overflow="fold")
        for peer_id, p in sorted(info["peers"].items(), key=lambda item: -_step_of(item[1])):
            maddrs = p.get("maddrs") if isinstance(p.get("maddrs"), list) else []
            table.add_row(
                Text(peer_id),
                Text("\n".join(str(m).split("/p2p/")[0] for m in maddrs) or "-"),
                Text(str(p.get("step", "-"))),
                _number(p.get("loss"), ".3f"),
                _number(p.get("samples_per_s"), ".0f"),
                _number(p.get("accuracy"), ".3f"),
                "-" if p.get("last_report_s") is None else f"{p['last_report_s']:.0f} s ago",
            )
        _output.stdout.print(table)


def _step_of(progress: dict[str, Any]) -> float:
    step = progress.get("step")  # any peer writes these entries: never trust their types
    return float(step) if isinstance(step, (int, float)) else 0.0


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"
