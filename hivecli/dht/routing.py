"""Kademlia's routing table as a pure data structure: no I/O, no clocks but the ones passed in.

Node and key IDs are 160-bit integers (`DHTID`); distance is XOR. The table is a list of
k-buckets covering the ID space. A full bucket splits when it contains our own ID, or when its
depth is not a multiple of `depth_modulo` (which keeps a few extra buckets near other regions,
as in the Kademlia paper's "relaxed" splitting); otherwise the newcomer waits in a replacement
list and the caller is told which stale node to ping.
"""

from __future__ import annotations

import hashlib
import heapq
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from hivecli.net.framing import pack
from hivecli.net.identity import PeerID

ID_BITS = 160
ID_BYTES = ID_BITS // 8
MAX_ID = 2**ID_BITS


class DHTID(int):
    """A 160-bit identifier of a node or a key."""

    @classmethod
    def generate(cls) -> DHTID:
        return cls(int.from_bytes(os.urandom(ID_BYTES), "big"))

    @classmethod
    def from_key(cls, key: object) -> DHTID:
        """The ID under which `key` (any msgpack-serializable value) is stored."""
        return cls(int.from_bytes(hashlib.sha1(pack(key)).digest(), "big"))

    @classmethod
    def from_bytes_(cls, raw: bytes) -> DHTID:
        """Parse a 20-byte wire ID. Raises ValueError for any other length."""
        if not isinstance(raw, bytes) or len(raw) != ID_BYTES:
            raise ValueError(f"a DHT ID is {ID_BYTES} bytes, got {raw!r:.40}")
        return cls(int.from_bytes(raw, "big"))

    def to_bytes_(self) -> bytes:
        return int(self).to_bytes(ID_BYTES, "big")

    def xor_distance(self, other: int) -> int:
        return int(self) ^ int(other)

    def __repr__(self) -> str:
        return f"DHTID({int(self):040x})"


@dataclass
class KBucket:
    """Nodes whose IDs fall in [lower, upper), least recently seen first."""

    lower: int
    upper: int
    depth: int = 0
    nodes: OrderedDict[DHTID, PeerID] = field(default_factory=OrderedDict)
    replacements: OrderedDict[DHTID, PeerID] = field(default_factory=OrderedDict)

    def covers(self, node_id: int) -> bool:
        return self.lower <= node_id < self.upper

    def split(self) -> tuple[KBucket, KBucket]:
        middle = (self.lower + self.upper) // 2
        left, right = KBucket(self.lower, middle, self.depth + 1), KBucket(middle, self.upper, self.depth + 1)
        for source in (self.nodes, self.replacements):
            for node_id, peer_id in source.items():
                target = left if node_id < middle else right
                (target.nodes if source is self.nodes else target.replacements)[node_id] = peer_id
        return left, right


class RoutingTable:
    """Which nodes we know, organised by distance from `node_id`."""

    def __init__(self, node_id: DHTID, bucket_size: int = 20, depth_modulo: int = 5):
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
        self.node_id = node_id
        self.bucket_size = bucket_size
        self.depth_modulo = depth_modulo
        self.buckets = [KBucket(0, MAX_ID)]
        self.peer_to_node: dict[PeerID, DHTID] = {}
        self.node_to_peer: dict[DHTID, PeerID] = {}

    def _bucket_index(self, node_id: int) -> int:
        low, high = 0, len(self.buckets) - 1
        while low < high:  # buckets are sorted and contiguous: bisect on their lower bounds
            mid = (low + high + 1) // 2
            if self.buckets[mid].lower <= node_id:
                low = mid
            else:
                high = mid - 1
        return low

    def add_or_update(self, node_id: DHTID, peer_id: PeerID) -> DHTID | None:
        """Record that `node_id` (reachable as `peer_id`) is alive.

        Returns:
            None if the node is in the table now; otherwise the least recently seen node of its
            full bucket, which the caller should ping and `remove` if it does not answer (the
            newcomer then takes its place from the replacement list).
        """
        if node_id == self.node_id:
            return None
        old_node = self.peer_to_node.get(peer_id)
        if old_node is not None and old_node != node_id:
            self.remove(old_node)  # the peer restarted with a new node ID
        while True:
            index = self._bucket_index(node_id)
            bucket = self.buckets[index]
            if node_id in bucket.nodes:
                bucket.nodes[node_id] = peer_id
                bucket.nodes.move_to_end(node_id)
                self._index(node_id, peer_id)
                return None
            if len(bucket.nodes) < self.bucket_size:
                bucket.nodes[node_id] = peer_id
                bucket.replacements.pop(node_id, None)
                self._index(node_id, peer_id)
                return None
            if bucket.covers(self.node_id) or bucket.depth % self.depth_modulo != 0:
                self.buckets[index : index + 1] = bucket.split()
                continue
            bucket.replacements[node_id] = peer_id
            bucket.replacements.move_to_end(node_id)
            while len(bucket.replacements) > self.bucket_size:
                bucket.replacements.popitem(last=False)
            return next(iter(bucket.nodes))

    def remove(self, node_id: DHTID) -> bool:
        """Forget a node (it did not answer); promote the freshest replacement. Returns True if it was there."""
        bucket = self.buckets[self._bucket_index(node_id)]
        bucket.replacements.pop(node_id, None)
        peer_id = bucket.nodes.pop(node_id, None)
        if peer_id is None:
            return False
        self.node_to_peer.pop(node_id, None)
        if self.peer_to_node.get(peer_id) == node_id:
            del self.peer_to_node[peer_id]
        if bucket.replacements:
            new_id, new_peer = bucket.replacements.popitem(last=True)
            bucket.nodes[new_id] = new_peer
            self._index(new_id, new_peer)
        return True

    def _index(self, node_id: DHTID, peer_id: PeerID) -> None:
        self.node_to_peer[node_id] = peer_id
        self.peer_to_node[peer_id] = node_id

    def nearest(self, key_id: int, k: int, exclude: DHTID | None = None) -> list[tuple[DHTID, PeerID]]:
        """The k known nodes closest to `key_id` by XOR distance, closest first.

        A full scan: tables hold a few hundred nodes at most, where this beats walking buckets.
        """
        nearest = heapq.nsmallest(k + 1, self.node_to_peer.items(), key=lambda item: item[0] ^ key_id)
        return [item for item in nearest if item[0] != exclude][:k]

    def bucket_of(self, node_id: int) -> KBucket:
        return self.buckets[self._bucket_index(node_id)]

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.node_to_peer

    def __len__(self) -> int:
        return len(self.node_to_peer)

    def __iter__(self) -> Iterator[tuple[DHTID, PeerID]]:
        return iter(list(self.node_to_peer.items()))
