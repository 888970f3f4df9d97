"""Find the peers of a DHT by asking nodes for their routing tables, breadth first."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from hivecli._exceptions import HiveError, PeerUnreachableError
from hivecli.dht.node import DHTNode
from hivecli.net.identity import PeerID
from hivecli.net.multiaddr import Multiaddr
from hivecli.utils.loops import timeout as _timeout


@dataclass
class PeerInfo:
    """A peer as the crawl saw it."""

    peer_id: PeerID
    maddrs: list[Multiaddr] = field(default_factory=list)
    last_seen_s: float | None = None  # how long ago the node that named it last heard from it
    rtt_ms: float | None = None  # our round trip to it, if we asked it ourselves
    reachable: bool | None = None  # None: not asked
    net: dict[str, Any] | None = None  # its `net.info`: reachability, relays used, relay traffic


async def crawl(
    node: DHTNode, start: Multiaddr, max_peers: int = 1000, timeout: float = 10.0, parallel: int = 16
) -> list[PeerInfo]:
    """Ask `start` for the peers it knows, then ask those, until nobody names a new peer.

    Args:
        max_peers: stop asking once this many peers are known.
        timeout: overall deadline in seconds; peers not asked by then are listed unasked.

    Raises:
        PeerUnreachableError: `start` itself did not answer (the error says why).
    """
    assert start.peer_id is not None
    found: dict[PeerID, PeerInfo] = {start.peer_id: PeerInfo(start.peer_id, [start.without_peer_id()])}
    deadline = time.monotonic() + timeout

    async def ask(info: PeerInfo, target: PeerID | Multiaddr) -> None:
        began = time.perf_counter()
        peers = await node.protocol.call_peers(target)
        info.reachable = peers is not None
        if peers is None:
            return
        info.rtt_ms = (time.perf_counter() - began) * 1000
        if info.last_seen_s is None:
            info.last_seen_s = 0.0
        info.net = await _net_info(node, info.peer_id)
        # peers behind NAT serve no DHT, so no routing table names them: their relay does
        for relayed in info.net.get("reserved", []) if info.net else []:
            if relayed not in found and len(found) < max_peers and relayed != node.peer_id:
                relay_addrs = node.host.address_book.get(info.peer_id, [])
                circuits = [m.via(info.peer_id) for m in relay_addrs if m.relay is None][:1]
                found[relayed] = PeerInfo(relayed, circuits)
                node.host.add_addrs(relayed, circuits)
        for entry in peers:
            known = found.get(entry["peer_id"])
            if known is None and len(found) < max_peers and entry["peer_id"] != node.peer_id:
                found[entry["peer_id"]] = PeerInfo(entry["peer_id"], entry["maddrs"], entry["last_seen_s"])
                node.host.add_addrs(entry["peer_id"], entry["maddrs"])
            elif known is not None and known.last_seen_s is not None:
                known.last_seen_s = min(known.last_seen_s, entry["last_seen_s"])

    try:
        async with _timeout(timeout):
            await node.host.connect(start)
    except asyncio.TimeoutError:
        raise PeerUnreachableError(
            f"{start} did not answer within {timeout:g} s; check the address and "
            f"that the peer is running and reachable from here"
        ) from None
    except PeerUnreachableError as e:
        raise PeerUnreachableError(f"{e}; check the address and that the peer is running") from None
    await ask(found[start.peer_id], start)
    if not found[start.peer_id].reachable:
        raise PeerUnreachableError(f"{start} accepted the connection but did not answer the DHT request")
    semaphore = asyncio.Semaphore(parallel)

    async def ask_bounded(info: PeerInfo) -> None:
        async with semaphore:
            remaining = deadline - time.monotonic()
            if remaining > 0:
                try:
                    async with _timeout(remaining):
                        await ask(info, info.peer_id)
                except asyncio.TimeoutError:
                    info.reachable = False

    while time.monotonic() < deadline:
        batch = [info for info in found.values() if info.reachable is None]
        if not batch:
            break
        await asyncio.gather(*(ask_bounded(info) for info in batch))
    return sorted(found.values(), key=lambda info: (info.peer_id != start.peer_id, str(info.peer_id)))


async def _net_info(node: DHTNode, peer: PeerID) -> dict[str, Any] | None:
    """A peer's `net.info` (see Host), checked for shape; None if it did not answer."""
    try:
        conn = node.host.connection_to(peer)
        if conn is None:
            return None
        raw = (await conn.call("net.info", {}, timeout=node.settings.wait_timeout)).payload
    except HiveError:
        return None
    if not isinstance(raw, dict):
        return None
    relay = raw.get("relay") if isinstance(raw.get("relay"), dict) else {}

    def peers(name: str) -> list[PeerID]:
        found = []
        for item in raw.get(name, [])[:64] if isinstance(raw.get(name), list) else []:
            try:
                found.append(PeerID(item))
            except (ValueError, TypeError):
                continue
        return found

    return {
        "reachability": raw.get("reachability") if isinstance(raw.get("reachability"), str) else None,
        "relays": peers("relays"),
        "reserved": peers("reserved"),
        "relay": {k: v for k, v in relay.items() if isinstance(k, str) and isinstance(v, (int, bool))},
    }
