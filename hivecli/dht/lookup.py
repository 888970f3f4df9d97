"""Kademlia's iterative lookup, with several requests in flight at once.

Start from the nearest nodes in our routing table; ask each for the key; every answer names
nodes still closer, which join the candidates. The lookup ends when the `beam_size` closest
nodes seen so far have all answered (or failed), or as soon as `is_enough(record)` says the
record found is good enough (a plain `get` stops at the first live value). A node that left
its record out of a full reply still counts as having answered, but not as lacking the key.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from hivecli.dht.protocol import DHTProtocol, FindResult
from hivecli.dht.routing import DHTID
from hivecli.dht.storage import Record, merge_records
from hivecli.net.identity import PeerID


@dataclass
class LookupResult:
    nearest: list[tuple[DHTID, PeerID]] = field(default_factory=list)  # answered, closest first
    record: Record | None = None
    without_record: list[tuple[DHTID, PeerID]] = field(default_factory=list)  # answered, lacked the key


async def iterative_lookup(
    protocol: DHTProtocol,
    key_id: DHTID,
    *,
    beam_size: int | None = None,
    parallel: int | None = None,
    is_enough: Callable[[Record], bool] | None = None,
) -> LookupResult:
    """Find the nodes nearest to `key_id` (and the record stored there, if any).

    Args:
        beam_size: how many of the nearest nodes must answer (default: settings.beam_size).
        parallel: requests in flight (default: settings.parallel_rpc).
        is_enough: stop as soon as the record found so far satisfies it.

    Never raises for network trouble: peers that fail are skipped (and blacklisted).
    """
    settings = protocol.settings
    beam_size = beam_size or settings.effective_beam_size
    parallel = parallel or settings.parallel_rpc
    result = LookupResult()
    seen: dict[DHTID, PeerID] = {}
    to_ask: list[tuple[int, DHTID]] = []  # heap by distance
    answered: list[tuple[int, DHTID]] = []  # sorted by distance
    in_flight: dict[asyncio.Task[list[FindResult] | None], DHTID] = {}

    def consider(node_id: DHTID, peer: PeerID) -> None:
        if node_id in seen or node_id == protocol.node_id or protocol.blacklist.is_banned(peer):
            return
        seen[node_id] = peer
        heapq.heappush(to_ask, (node_id ^ key_id, node_id))

    for node_id, peer in protocol.routing_table.nearest(key_id, beam_size):
        consider(node_id, peer)

    def worth_asking(distance: int) -> bool:
        return len(answered) < beam_size or distance < answered[beam_size - 1][0]

    try:
        while True:
            while to_ask and len(in_flight) < parallel and worth_asking(to_ask[0][0]):
                _, node_id = heapq.heappop(to_ask)
                task = asyncio.ensure_future(protocol.call_find(seen[node_id], [key_id]))
                in_flight[task] = node_id
            if not in_flight:
                break
            done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                node_id = in_flight.pop(task)
                response = task.result()
                if response is None:
                    continue
                record, nearest, omitted = response[0]
                entry = (node_id ^ key_id, node_id)
                bisect.insort(answered, entry)
                if record is None:
                    if not omitted:  # a node that has the key too big to send needs no cached copy
                        result.without_record.append((node_id, seen[node_id]))
                else:
                    result.record = merge_records(result.record, record)
                for near_id, near_peer in nearest:
                    consider(near_id, near_peer)
            if result.record is not None and is_enough is not None and is_enough(result.record):
                break
    finally:
        for task in in_flight:
            task.cancel()
    result.nearest = [(node_id, seen[node_id]) for _, node_id in answered[:beam_size]]
    result.without_record.sort(key=lambda item: item[0] ^ key_id)
    return result
