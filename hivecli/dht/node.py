"""DHTNode: the asyncio DHT peer. Stores, gets, bootstraps, and keeps replicas alive.

Use `hivecli.DHT` from ordinary code; this class is for code already inside the node's loop.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from hivecli._exceptions import BootstrapError, ConfigError, HiveError, MalformedFrameError
from hivecli.dht.lookup import LookupResult, iterative_lookup
from hivecli.dht.protocol import DHTProtocol
from hivecli.dht.records import Record, SubkeyEntry, packed_subkey_owner, record_items, sign_entry
from hivecli.dht.rejoin import Rejoiner
from hivecli.dht.routing import DHTID, ID_BITS, MAX_ID
from hivecli.dht.settings import DHTSettings
from hivecli.dht.storage import LocalStorage, ValueWithExpiration, merge_records
from hivecli.net.framing import pack, unpack
from hivecli.net.host import Host
from hivecli.net.identity import PeerID
from hivecli.net.multiaddr import Multiaddr
from hivecli.utils.loops import wait_event
from hivecli.utils.timing import get_dht_time

logger = logging.getLogger(__name__)
# How long a lookup's nearest nodes serve later stores of the same key. Matchmaking stores its
# declaration every round, seconds to a minute apart, and a fresh lookup would put a round trip
# before every such store (at 50 ms RTT, 50 of the 250 ms a 4-peer group took to form). A
# nearer node that joined since gets the record from the handover (`_hand_over`); a node of the
# list that left the routing table (it failed) forces a fresh lookup.
_RECENT_NEAREST_S = 60.0
_RECENT_NEAREST_MAX = 256


# Handing records over to nodes that joined near our keys is done in the background, under a
# node-wide budget, so that a flood of fake newcomers costs bounded CPU and network.
_HANDOVER_SCAN_INTERVAL_S = 1.0  # at most one storage scan per this, for all newcomers queued meanwhile
_HANDOVER_QUEUE = 1024  # newcomers waiting for the next scan; more are not handed anything
_DEPARTED_PER_SCAN = 64  # departures checked per scan; the rest wait for the next one
_SCAN_CHUNK = 512  # keys examined between yields to the loop
_HANDOVER_BATCH = 256  # items per store request of a handover
_random = random.Random()  # our own: jitter drawn in a background thread leaves the global state alone


def _store_record(storage: LocalStorage, key_id: DHTID, record: Record) -> bool:
    """Apply a record to a local storage, part by part. Returns whether any part took effect."""
    if record.subkeys is None:
        return storage.store(key_id, record.value or b"", record.expiration_time)
    results = [storage.store(key_id, e.value, e.expiration_time, sub, e.signature) for sub, e in record.subkeys.items()]
    return any(results)


def decode_value(record: Record) -> ValueWithExpiration:
    """Turn stored bytes back into Python values.

    Subkeys anyone may write: one that does not decode (or decodes to something unhashable,
    such as a list) is skipped rather than hiding the others.

    Raises:
        MalformedFrameError: a regular value does not decode.
    """
    if record.subkeys is None:
        return ValueWithExpiration(unpack(record.value or b""), record.expiration_time)
    entries: dict[Any, ValueWithExpiration] = {}
    skipped = 0
    for sub, entry in record.subkeys.items():
        try:
            entries[unpack(sub)] = ValueWithExpiration(unpack(entry.value), entry.expiration_time)
        except (MalformedFrameError, TypeError):
            skipped += 1
    if skipped:
        logger.debug("Skipped %d undecodable subkeys", skipped)
    return ValueWithExpiration(entries, record.expiration_time)


def nearest_in_sorted(ids: list[int], key: int, count: int) -> list[int]:
    """The `count` IDs of the sorted list `ids` nearest to `key` by XOR, nearest first.

    O(log n) bisects plus a small sort: the smallest aligned subtree around `key` that holds
    `count` IDs contains exactly the nearest ones (all IDs in it share more leading bits with
    `key` than any ID outside it).
    """
    if len(ids) <= count:
        return sorted(ids, key=lambda x: x ^ key)
    low, high = 0, ID_BITS
    while low < high:
        mid = (low + high) // 2
        base = (key >> mid) << mid
        if bisect.bisect_left(ids, base + (1 << mid)) - bisect.bisect_left(ids, base) >= count:
            high = mid
        else:
            low = mid + 1
    base = (key >> low) << low
    candidates = ids[bisect.bisect_left(ids, base) : bisect.bisect_left(ids, base + (1 << low))]
    return heapq.nsmallest(count, candidates, key=lambda x: x ^ key)


class DHTNode:
    """One DHT peer inside an asyncio loop. Create with `await DHTNode.create(...)`."""

    def __init__(self, host: Host, settings: DHTSettings, client_mode: bool, node_id: DHTID | None = None):
        self.host = host
        self.settings = settings
        self.client_mode = client_mode
        self.requested_client_mode = client_mode  # what the user asked for, whatever reachability says
        self.node_id = node_id or DHTID.generate()
        self.protocol = DHTProtocol(host, self.node_id, settings, client_mode)
        self.protocol.on_new_node = self._on_new_node
        self.protocol.on_node_removed = self._on_node_removed
        self.initial_peers: list[Multiaddr] = []
        # Times this node re-joined the DHT after being cut off: whatever it stored meanwhile reached
        # only its own storage, so code that publishes (matchmaking) publishes again when this changes.
        self.rejoins = 0
        self._needs_replication: set[DHTID] = set()
        self._wake_maintenance = asyncio.Event()
        self._maintenance: asyncio.Task[None] | None = None
        self.rejoiner = Rejoiner(self)  # re-joins the DHT whenever this node is cut off from it
        self._last_lookup = 0.0  # monotonic time of this node's latest lookup
        # key -> (when, nearest nodes) of recent complete lookups: a store right after a lookup of the
        # same key (matchmaking declares, polls and declares again every round) skips its own lookup
        self._recent_nearest: dict[DHTID, tuple[float, list[tuple[DHTID, PeerID]]]] = {}
        self._newcomers: dict[DHTID, PeerID] = {}  # waiting for the next handover scan
        self._departed: set[DHTID] = set()  # removed nodes whose keys may need another replica
        self._wake_handover = asyncio.Event()
        self._handover: asyncio.Task[None] | None = None
        self._handover_clock = 0.0  # monotonic time until which the handover budget is spent

    @classmethod
    async def create(
        cls,
        host: Host,
        *,
        initial_peers: Sequence[Multiaddr] = (),
        host_maddrs: Sequence[Multiaddr] = (),
        settings: DHTSettings | None = None,
        client_mode: bool = False,
    ) -> DHTNode:
        """Listen, join the DHT through `initial_peers` (if any) and start maintenance.

        Raises:
            BootstrapError: initial peers were given and none of them answered.
            ConfigError: a listen address cannot be bound.
        """
        node = cls(host, settings or DHTSettings(), client_mode)
        try:
            await host.listen(list(host_maddrs))
            if initial_peers:
                await node.bootstrap(initial_peers)
        except BaseException:
            await node.shutdown()
            raise
        node._maintenance = asyncio.get_running_loop().create_task(node._maintain())
        node._handover = asyncio.get_running_loop().create_task(node._hand_over())
        node.rejoiner.start()
        return node

    @property
    def peer_id(self) -> PeerID:
        return self.host.peer_id

    def set_client_mode(self, client_mode: bool) -> None:
        """Stop (True) or resume (False) serving the DHT to others; see DHTProtocol.set_client_mode."""
        self.client_mode = client_mode
        self.protocol.set_client_mode(client_mode)

    async def bootstrap(self, initial_peers: Sequence[Multiaddr]) -> None:
        """Ping the initial peers; as soon as one answers, look up our own ID to fill the table.

        Raises:
            BootstrapError: none answered within the bootstrap timeout; lists why for each.
        """
        self.initial_peers = list(initial_peers)
        timeout = self.settings.effective_bootstrap_timeout
        errors: dict[str, str] = {}

        async def ping(maddr: Multiaddr) -> bool:
            try:
                response = await self.protocol.request(maddr, "dht.ping", {}, timeout)
            except asyncio.TimeoutError:
                errors[str(maddr)] = f"no answer within {timeout:g} s"
                return False
            except (HiveError, ValueError) as e:
                errors[str(maddr)] = str(e) or type(e).__name__
                return False
            if response.get("node") is None:
                errors[str(maddr)] = "it is a client-mode node, which cannot be joined through"
                return False
            return True

        pending = {asyncio.ensure_future(ping(m)) for m in self.initial_peers}
        answered = False
        while pending and not answered:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            answered = any(task.result() for task in done)
        for task in pending:  # the rest finish in the background; they only add to the table
            self.protocol.spawn(task)
        if not answered:
            details = "; ".join(f"{addr}: {reason}" for addr, reason in errors.items())
            raise BootstrapError(
                f"Could not reach any of the {len(self.initial_peers)} initial peers ({details}). "
                f"Check that the addresses are current and that those peers are running and reachable."
            )
        await self.refill_table()

    async def refill_table(self) -> None:
        """Look up our own ID, wide and all at once, to fill the routing table with our neighbours
        (after joining or re-joining the DHT)."""
        k = self.settings.bucket_size
        await self._lookup(self.node_id, beam_size=k, parallel=k)

    # ---- store / get ----------------------------------------------------------------------

    async def _lookup(self, key_id: DHTID, remember: bool = False, **kwargs: Any) -> LookupResult:
        self._last_lookup = time.monotonic()
        result = await iterative_lookup(self.protocol, key_id, **kwargs)
        if remember and result.nearest:
            if len(self._recent_nearest) >= _RECENT_NEAREST_MAX:
                self._recent_nearest.clear()
            self._recent_nearest[key_id] = (time.monotonic(), result.nearest)
        return result

    async def _nearest_for_store(self, key_id: DHTID) -> list[tuple[DHTID, PeerID]]:
        recent = self._recent_nearest.get(key_id)
        if (
            recent is not None
            and time.monotonic() - recent[0] < _RECENT_NEAREST_S
            and all(node_id in self.protocol.routing_table for node_id, _ in recent[1])
        ):
            return recent[1]
        # a store must hear from the whole beam anyway, so ask all of it at once
        lookup = await self._lookup(key_id, remember=True, parallel=self.settings.effective_beam_size)
        return lookup.nearest

    async def store(self, key: Any, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        """Store `value` under `key` (and `subkey`) on the nearest nodes until `expiration_time`.

        Returns:
            True if at least one node (possibly this one) accepted it; False if it is already
            expired or every replica holds a value that is at least as new.

        A subkey made with `owned_subkey` for this node's peer ID is signed, so that only this
        node can ever write it (see `hivecli.dht.records`).

        Raises:
            ConfigError: key, subkey or value cannot be serialized with msgpack; the value is
                over max_value_bytes; the subkey is owned by another peer (this node cannot
                sign for it) or carries a malformed owner marker; an owned subkey's expiration
                is more than max_expiration away (nodes refuse those).
        """
        try:
            key_id = DHTID.from_key(key)
            value_bytes = pack(value)
            subkey_bytes = None if subkey is None else pack(subkey)
        except (TypeError, ValueError, OverflowError) as e:
            raise ConfigError(f"DHT keys, subkeys and values must be msgpack-serializable: {e}") from None
        if len(value_bytes) > self.settings.max_value_bytes:
            raise ConfigError(
                f"a DHT value may be at most {self.settings.max_value_bytes} bytes packed; this one is "
                f"{len(value_bytes)} (store large data elsewhere and put a reference in the DHT)"
            )
        expiration = float(expiration_time)
        if subkey_bytes is None:
            return await self.store_record(key_id, Record(value_bytes, expiration))
        signature = None
        try:
            owner = packed_subkey_owner(subkey_bytes)
        except ValueError as e:
            raise ConfigError(f"subkey {subkey!r:.80}: {e}") from None
        if owner is not None:
            if owner != self.peer_id:
                raise ConfigError(
                    f"subkey {subkey!r:.80} is owned by peer {owner}; this node ({self.peer_id}) cannot sign for it"
                )
            if expiration > get_dht_time() + self.settings.max_expiration:
                raise ConfigError(
                    f"an owned subkey may expire at most {self.settings.max_expiration:g} s from now "
                    f"(max_expiration); nodes refuse signed records beyond that"
                )
            signature = sign_entry(self.host.identity, key_id.to_bytes_(), subkey_bytes, value_bytes, expiration)
        entry = SubkeyEntry(value_bytes, expiration, signature)
        return await self.store_record(key_id, Record(None, expiration, {subkey_bytes: entry}))

    async def store_record(self, key_id: DHTID, record: Record) -> bool:
        """Store a record (signatures included) on the nearest nodes; see `store`."""
        if not record.expiration_time > get_dht_time():
            return False
        nearest = await self._nearest_for_store(key_id)
        targets: list[DHTID | None] = [node_id for node_id, _ in nearest]
        if not self.client_mode:
            targets.append(None)  # None stands for this node
        targets.sort(key=lambda node_id: (self.node_id if node_id is None else node_id) ^ key_id)
        targets = targets[: self.settings.num_replicas]
        peers = dict(nearest)
        items = record_items(key_id.to_bytes_(), record)
        stored_here = None in targets and _store_record(self.protocol.storage, key_id, record)
        remote = [self.protocol.call_store(peers[node_id], items) for node_id in targets if node_id is not None]
        results = await asyncio.gather(*remote)
        return stored_here or any(ok is not None and any(ok) for ok in results)

    async def get(self, key: Any, latest: bool = False) -> ValueWithExpiration | None:
        """The value stored under `key`, or None if no live value was found.

        A dictionary value comes back as {subkey: ValueWithExpiration}. With `latest=True` the
        lookup visits all the nearest nodes and returns the newest value instead of the first.
        """
        try:
            key_id = DHTID.from_key(key)
        except (TypeError, ValueError, OverflowError) as e:
            raise ConfigError(f"DHT keys must be msgpack-serializable: {e}") from None
        record = await self.get_record(key_id, latest)
        if record is None:
            return None
        try:
            return decode_value(record)
        except MalformedFrameError as e:
            logger.warning("Ignoring an undecodable value under key %r: %s", key, e)
            return None

    async def get_record(self, key_id: DHTID, latest: bool = False) -> Record | None:
        local = merge_records(self.protocol.storage.get(key_id), self.protocol.cache.get(key_id))
        if local is not None and not latest:
            return local
        now = get_dht_time()
        lookup = await self._lookup(
            key_id, remember=latest, is_enough=None if latest else (lambda record: record.expiration_time > now)
        )
        found = lookup.record
        if found is not None and found.expiration_time <= get_dht_time():
            found = None
        if found is not None:
            if self.settings.cache_locally:
                _store_record(self.protocol.cache, key_id, found)
            if self.settings.cache_on_lookup_path and lookup.without_record:
                cache_peer = lookup.without_record[0][1]
                self.protocol.spawn(
                    self.protocol.call_store(cache_peer, record_items(key_id.to_bytes_(), found, in_cache=True))
                )
        return merge_records(local, found)

    # ---- keeping replicas alive -------------------------------------------------------------

    def _on_node_removed(self, node_id: DHTID) -> None:
        # If the departed node was one of a key's replicas (as we see it), the key is down a copy:
        # found out by the next handover scan, not here, so departures cost one scan a second.
        # Over a thousand departures within a second are not a real swarm: beyond the queue they
        # are not checked, as re-replicating everything would be a lever for an attacker.
        if len(self._departed) < _HANDOVER_QUEUE:
            self._departed.add(node_id)
            self._wake_handover.set()
        self.rejoiner.wake()  # the table may be empty now

    def _on_new_node(self, node_id: DHTID, peer: PeerID) -> None:
        # Queued for the next scan: a flood of newcomers (real or made up) is batched into it.
        if len(self._newcomers) < _HANDOVER_QUEUE:
            self._newcomers[node_id] = peer
            self._wake_handover.set()

    async def _hand_over(self) -> None:
        """Background task: at most one storage scan a second for all queued newcomers and
        departures, then the handover sent at most `handover_rate` items a second."""
        last_scan = -_HANDOVER_SCAN_INTERVAL_S
        while True:
            await self._wake_handover.wait()
            await asyncio.sleep(max(0.0, last_scan + _HANDOVER_SCAN_INTERVAL_S - time.monotonic()))
            self._wake_handover.clear()
            newcomers, self._newcomers = self._newcomers, {}
            departed = set(list(self._departed)[:_DEPARTED_PER_SCAN])
            self._departed -= departed
            if self._departed:
                self._wake_handover.set()
            try:
                outgoing = await self._scan(newcomers, departed)
                # the pause counts from the end of a scan: back-to-back scans (~10 us a key, at
                # most half the CPU while running) take at most about a third of one core
                last_scan = time.monotonic()
                for node_id, items in outgoing.items():
                    await self._send_handover(node_id, newcomers[node_id], items)
            except asyncio.CancelledError:
                raise
            except Exception:
                last_scan = time.monotonic()
                logger.exception("DHT handover failed; newcomers will get records from later stores")

    async def _scan(self, newcomers: dict[DHTID, PeerID], departed: set[DHTID]) -> dict[DHTID, list[list[Any]]]:
        """Which of our records each newcomer is now a replica of (only the nearest current
        holder sends), and which keys lost a replica with the departed nodes."""
        table = self.protocol.routing_table
        newcomers = {node_id: peer for node_id, peer in newcomers.items() if node_id in table}
        if not newcomers and not departed:
            return {}
        known = sorted([*table.node_to_peer, self.node_id])
        replicas_wanted = self.settings.num_replicas
        outgoing: dict[DHTID, list[list[Any]]] = {}
        began = time.monotonic()
        for count, key_id in enumerate(self.protocol.storage.keys()):
            if count and count % _SCAN_CHUNK == 0:
                # yield for as long as we computed: a scan takes at most about half the CPU
                await asyncio.sleep(time.monotonic() - began)
                began = time.monotonic()
            replicas = nearest_in_sorted(known, key_id, replicas_wanted)
            if departed and (
                len(replicas) < replicas_wanted or any((gone ^ key_id) < (replicas[-1] ^ key_id) for gone in departed)
            ):
                self._needs_replication.add(key_id)
            targets = [node_id for node_id in replicas if node_id in newcomers]
            holders = [node_id for node_id in replicas if node_id not in newcomers]
            if targets and holders and holders[0] == self.node_id:
                record = self.protocol.storage.get(key_id)
                if record is not None:
                    items = record_items(key_id.to_bytes_(), record)
                    for node_id in targets:
                        outgoing.setdefault(DHTID(node_id), []).extend(items)
        if self._needs_replication:
            self._wake_maintenance.set()
        return outgoing

    async def _send_handover(self, node_id: DHTID, peer: PeerID, items: list[list[Any]]) -> None:
        for start in range(0, len(items), _HANDOVER_BATCH):
            if node_id not in self.protocol.routing_table:
                return  # gone (or never real): the rest of its share of the budget is not spent
            batch = items[start : start + _HANDOVER_BATCH]
            now = time.monotonic()
            begin = max(self._handover_clock, now)
            self._handover_clock = begin + len(batch) / self.settings.handover_rate
            await asyncio.sleep(begin - now)
            self.protocol.spawn(self.protocol.call_store(peer, batch))

    async def _maintain(self) -> None:
        period = self.settings.refresh_period
        while True:
            # jitter keeps a swarm started all at once from refreshing in lockstep
            await wait_event(self._wake_maintenance, period * _random.uniform(0.75, 1.25))
            self._wake_maintenance.clear()
            try:
                await self._maintenance_pass()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("DHT maintenance pass failed; will retry in %.0f s", period)

    async def _maintenance_pass(self) -> None:
        protocol = self.protocol
        period = self.settings.refresh_period
        now = time.monotonic()
        # Liveness matters most for our nearest neighbours: they hold the other replicas of the
        # keys we hold. Anyone else that died is found out when a lookup asks it.
        neighbours = protocol.routing_table.nearest(self.node_id, 2 * self.settings.num_replicas)
        stale = [peer for node_id, peer in neighbours if now - protocol.last_seen.get(node_id, 0.0) > period]
        await asyncio.gather(*(protocol.call_ping(peer) for peer in stale))
        if len(protocol.routing_table) and now - self._last_lookup > period:
            # an idle node refreshes a random region of the table, finding nodes that joined
            await self._lookup(DHTID(_random.randrange(MAX_ID)))
        await self._replicate()

    async def _replicate(self) -> None:
        keys, self._needs_replication = self._needs_replication, set()
        for key_id in keys:
            record = self.protocol.storage.get(key_id)
            if record is not None:
                await self.store_record(key_id, record)

    # ---- lifecycle ------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop maintenance and close every connection and listener. Idempotent."""
        for task in (self._maintenance, self._handover):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.rejoiner.aclose()
        await self.protocol.aclose()
        await self.host.aclose()
