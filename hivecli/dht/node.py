"""DHTNode: the asyncio DHT peer. Stores, gets, bootstraps, and keeps replicas alive.

Use `hivecli.DHT` from ordinary code; this class is for code already inside the node's loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from hivecli._exceptions import BootstrapError, ConfigError, HiveError, MalformedFrameError
from hivecli.dht.lookup import LookupResult, iterative_lookup
from hivecli.dht.protocol import MAX_ITEMS_PER_REQUEST, DHTProtocol
from hivecli.dht.routing import DHTID, MAX_ID
from hivecli.dht.settings import DHTSettings
from hivecli.dht.storage import LocalStorage, Record, ValueWithExpiration, merge_records
from hivecli.net.framing import pack, unpack
from hivecli.net.host import Host
from hivecli.net.identity import PeerID
from hivecli.net.multiaddr import Multiaddr
from hivecli.utils.loops import wait_event
from hivecli.utils.timing import get_dht_time

logger = logging.getLogger(__name__)
_RECENT_NEAREST_S = 2.0  # how long a lookup's nearest nodes serve later stores of the same key
_RECENT_NEAREST_MAX = 256


def record_items(key_id: DHTID, record: Record, in_cache: bool = False) -> list[list[Any]]:
    """A record as `dht.store` items (one per subkey for a dictionary)."""
    if record.subkeys is None:
        return [[key_id.to_bytes_(), None, record.value, record.expiration_time, in_cache]]
    return [[key_id.to_bytes_(), sub, value, exp, in_cache] for sub, (value, exp) in record.subkeys.items()]


def _store_record(storage: LocalStorage, key_id: DHTID, record: Record) -> bool:
    """Apply a record to a local storage, part by part. Returns whether any part took effect."""
    results = [storage.store(key_id, value, exp, subkey) for _, subkey, value, exp, _ in record_items(key_id, record)]
    return any(results)


def decode_value(record: Record) -> ValueWithExpiration:
    """Turn stored bytes back into Python values. Raises MalformedFrameError if they do not decode."""
    if record.subkeys is None:
        return ValueWithExpiration(unpack(record.value or b""), record.expiration_time)
    return ValueWithExpiration(
        {unpack(sub): ValueWithExpiration(unpack(value), exp) for sub, (value, exp) in record.subkeys.items()},
        record.expiration_time,
    )


class DHTNode:
    """One DHT peer inside an asyncio loop. Create with `await DHTNode.create(...)`."""

    def __init__(self, host: Host, settings: DHTSettings, client_mode: bool, node_id: DHTID | None = None):
        self.host = host
        self.settings = settings
        self.client_mode = client_mode
        self.node_id = node_id or DHTID.generate()
        self.protocol = DHTProtocol(host, self.node_id, settings, client_mode)
        self.protocol.on_new_node = self._on_new_node
        self.protocol.on_node_removed = self._on_node_removed
        self.initial_peers: list[Multiaddr] = []
        self._needs_replication: set[DHTID] = set()
        self._wake_maintenance = asyncio.Event()
        self._maintenance: asyncio.Task[None] | None = None
        self._last_lookup = 0.0  # monotonic time of this node's latest lookup
        self._failed_rejoins = 0  # maintenance passes in a row that could not re-join the DHT
        # key -> (when, nearest nodes) of recent complete lookups: a store right after a lookup of the
        # same key (matchmaking declares, polls and declares again every round) skips its own lookup
        self._recent_nearest: dict[DHTID, tuple[float, list[tuple[DHTID, PeerID]]]] = {}

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
        return node

    @property
    def peer_id(self) -> PeerID:
        return self.host.peer_id

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
        if recent is not None and time.monotonic() - recent[0] < _RECENT_NEAREST_S:
            return recent[1]
        # a store must hear from the whole beam anyway, so ask all of it at once
        lookup = await self._lookup(key_id, remember=True, parallel=self.settings.effective_beam_size)
        return lookup.nearest

    async def store(self, key: Any, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        """Store `value` under `key` (and `subkey`) on the nearest nodes until `expiration_time`.

        Returns:
            True if at least one node (possibly this one) accepted it; False if it is already
            expired or every replica holds a value that is at least as new.

        Raises:
            ConfigError: key, subkey or value cannot be serialized with msgpack.
        """
        try:
            key_id = DHTID.from_key(key)
            value_bytes = pack(value)
            subkey_bytes = None if subkey is None else pack(subkey)
        except (TypeError, ValueError, OverflowError) as e:
            raise ConfigError(f"DHT keys, subkeys and values must be msgpack-serializable: {e}") from None
        expiration = float(expiration_time)
        if subkey_bytes is None:
            record = Record(value_bytes, expiration)
        else:
            record = Record(None, expiration, {subkey_bytes: (value_bytes, expiration)})
        return await self.store_record(key_id, record)

    async def store_record(self, key_id: DHTID, record: Record) -> bool:
        if record.expiration_time <= get_dht_time():
            return False
        nearest = await self._nearest_for_store(key_id)
        targets: list[DHTID | None] = [node_id for node_id, _ in nearest]
        if not self.client_mode:
            targets.append(None)  # None stands for this node
        targets.sort(key=lambda node_id: (self.node_id if node_id is None else node_id) ^ key_id)
        targets = targets[: self.settings.num_replicas]
        peers = dict(nearest)
        items = record_items(key_id, record)
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
                self.protocol.spawn(self.protocol.call_store(cache_peer, record_items(key_id, found, in_cache=True)))
        return merge_records(local, found)

    # ---- keeping replicas alive -------------------------------------------------------------

    def _replica_set(self, key_id: DHTID) -> list[DHTID]:
        """Who should hold `key_id` as far as we know: the nearest nodes, this one included."""
        nearest = [node_id for node_id, _ in self.protocol.routing_table.nearest(key_id, self.settings.num_replicas)]
        return sorted([*nearest, self.node_id], key=lambda n: n ^ key_id)[: self.settings.num_replicas]

    def _on_node_removed(self, node_id: DHTID) -> None:
        # If the departed node was one of a key's replicas (as we see it), the key is down a copy.
        for key_id, _ in self.protocol.storage.items():
            replicas = self._replica_set(key_id)
            if len(replicas) < self.settings.num_replicas or (node_id ^ key_id) < (replicas[-1] ^ key_id):
                self._needs_replication.add(key_id)
        if self._needs_replication:
            self._wake_maintenance.set()

    def _on_new_node(self, node_id: DHTID, peer: PeerID) -> None:
        # Hand a newcomer the keys it is now a replica of; only the nearest current holder sends.
        items: list[list[Any]] = []
        for key_id, record in self.protocol.storage.items():
            replicas = self._replica_set(key_id)
            if node_id in replicas and next(n for n in replicas if n != node_id) == self.node_id:
                items.extend(record_items(key_id, record))
        for start in range(0, len(items), MAX_ITEMS_PER_REQUEST):
            self.protocol.spawn(self.protocol.call_store(peer, items[start : start + MAX_ITEMS_PER_REQUEST]))

    async def _maintain(self) -> None:
        period = self.settings.refresh_period
        while True:
            # jitter keeps a swarm started all at once from refreshing in lockstep
            await wait_event(self._wake_maintenance, period * random.uniform(0.75, 1.25))
            self._wake_maintenance.clear()
            try:
                await self._maintenance_pass()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("DHT maintenance pass failed; will retry in %.0f s", period)

    async def _maintenance_pass(self) -> None:
        protocol = self.protocol
        if len(protocol.routing_table) == 0 and self.initial_peers:
            # Cut off (e.g. after a network outage): find the swarm again through the initial peers.
            try:
                await self.bootstrap(self.initial_peers)
                logger.info("Re-joined the DHT through the initial peers")
                self._failed_rejoins = 0
            except BootstrapError as e:
                # The first miss is routine when the swarm ends (its last peers leave together):
                # only a peer that stays cut off for another pass is worth a warning.
                self._failed_rejoins += 1
                level = logging.WARNING if self._failed_rejoins > 1 else logging.INFO
                logger.log(level, "Cut off from the DHT: %s; retrying in about %.0f s", e, self.settings.refresh_period)
        period = self.settings.refresh_period
        now = time.monotonic()
        # Liveness matters most for our nearest neighbours: they hold the other replicas of the
        # keys we hold. Anyone else that died is found out when a lookup asks it.
        neighbours = protocol.routing_table.nearest(self.node_id, 2 * self.settings.num_replicas)
        stale = [peer for node_id, peer in neighbours if now - protocol.last_seen.get(node_id, 0.0) > period]
        await asyncio.gather(*(protocol.call_ping(peer) for peer in stale))
        if len(protocol.routing_table) and now - self._last_lookup > period:
            # an idle node refreshes a random region of the table, finding nodes that joined
            await self._lookup(DHTID(random.randrange(MAX_ID)))
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
        if self._maintenance is not None:
            self._maintenance.cancel()
            await asyncio.gather(self._maintenance, return_exceptions=True)
        await self.protocol.aclose()
        await self.host.aclose()
