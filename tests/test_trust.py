"""A stranger in the swarm cannot stop a run's averaging or state sharing through the DHT.

The attacks of step 6, as a hostile peer ran them: a regular value with an (almost) infinite
expiration stored over the run's matchmaking and state-sharing keys, and forged entries under
the honest peers' own subkeys. Every peer here is real, on loopback TCP.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from hivecli._exceptions import RemoteError
from hivecli.averaging import DecentralizedAverager
from hivecli.dht.dht import DHT
from hivecli.dht.node import DHTNode
from hivecli.dht.protocol import MAX_SIGNED_ITEMS_PER_REQUEST
from hivecli.dht.records import owned_subkey, sign_entry, store_item
from hivecli.dht.routing import DHTID
from hivecli.net.framing import pack
from hivecli.testing import local_swarm
from hivecli.utils.timing import get_dht_time

FAST = {"min_matchmaking_time": 2.0, "request_timeout": 1.0}


def _store_everywhere(dht: DHT, key: str, subkey: str | None, value: object, expiration: float) -> list[bool]:
    """Send one store to every node `dht` knows, signed with `dht`'s own key when `subkey` is
    given (a forgery when the subkey is someone else's); one "stored?" per node."""

    async def store(_dht: DHT, node: DHTNode) -> list[bool]:
        key_id, packed = DHTID.from_key(key).to_bytes_(), pack(value)
        sub = None if subkey is None else pack(subkey)
        signature = None if sub is None else sign_entry(node.host.identity, key_id, sub, packed, expiration)
        item = store_item(key_id, sub, packed, expiration, False, signature)
        answers = await asyncio.gather(
            *(node.protocol.call_store(peer, [item]) for _, peer in node.protocol.routing_table)
        )
        return [bool(a and a[0]) for a in answers]

    return dht.run_coroutine(store)


def test_shadowing_and_forged_declarations_do_not_stop_averaging_or_state_sharing() -> None:
    with local_swarm(4, seed=3, wait_timeout=1.0) as dhts:
        hostile, honest = dhts[0], dhts[1:3]
        tensors = [[torch.full((1000,), float(i))] for i in range(2)]
        avs = [
            DecentralizedAverager(t, d, prefix="demo", start=True, **FAST) for t, d in zip(tensors, honest, strict=True)
        ]
        try:
            forever = get_dht_time() + 1e12
            for key in ("demo.0b", "demo.all_averagers"):
                _store_everywhere(hostile, key, None, "squatted", forever)  # a plain value over the whole key
                for victim in honest:  # and a forged entry under each honest peer's own subkey
                    assert not any(_store_everywhere(hostile, key, owned_subkey(victim.peer_id), None, forever))

            controls = [av.step(wait=False, timeout=20) for av in avs]
            results = [c.result(timeout=60) for c in controls]
            assert all(set(r) == {d.peer_id for d in honest} for r in results)
            with avs[0].get_tensors() as (averaged,):
                assert torch.allclose(averaged, torch.full((1000,), 0.5))

            loaded = avs[1].load_state_from_peers(timeout=20)
            assert loaded is not None and torch.allclose(loaded[1][0], torch.full((1000,), 0.5))
        finally:
            for av in avs:
                av.shutdown()


def test_signature_checks_per_store_request_are_bounded() -> None:
    """Checking a signature costs ~100 us in the node's read loop: a request may carry at most
    MAX_SIGNED_ITEMS_PER_REQUEST of them (a hostile peer's 512 stalled a node for 70 ms), and
    honest senders split larger batches."""
    with local_swarm(2, seed=4, wait_timeout=1.0) as (target, sender):

        async def send(_dht: DHT, node: DHTNode) -> list[bool] | None:
            expiration = get_dht_time() + 60
            items = []
            for i in range(2 * MAX_SIGNED_ITEMS_PER_REQUEST + 5):
                key_id, sub, packed = DHTID.from_key(f"k{i}").to_bytes_(), pack(owned_subkey(node.peer_id)), pack(i)
                signature = sign_entry(node.host.identity, key_id, sub, packed, expiration)
                items.append(store_item(key_id, sub, packed, expiration, False, signature))
            with pytest.raises(RemoteError, match="at most 64 signed items"):
                await node.protocol.request(target.peer_id, "dht.store", {"items": items})
            return await node.protocol.call_store(target.peer_id, items)

        assert sender.run_coroutine(send) == [True] * (2 * MAX_SIGNED_ITEMS_PER_REQUEST + 5)
