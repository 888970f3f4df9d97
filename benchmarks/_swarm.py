"""Shared by the benchmarks that start one peer per process."""

from __future__ import annotations

from typing import Any


def join_swarm(rank: int, world: int, addr_q: Any) -> Any:
    """A started `hivecli.DHT`: rank 0 starts the DHT and hands its addresses to the `world - 1`
    others through `addr_q`; they join through it."""
    from hivecli import DHT

    if rank == 0:
        dht = DHT(start=True)
        for _ in range(world - 1):
            addr_q.put([str(a) for a in dht.get_visible_maddrs()])
        return dht
    return DHT(initial_peers=addr_q.get(timeout=60), start=True)
