"""The DHT's wire protocol: what a node serves and how it calls others.

Every request and response carries `node`: the sender's 20-byte DHT ID, or None for a client
(which is never added to routing tables). Methods:

    dht.ping   {node}                          -> {node, time}
    dht.store  {node, items: [[key_id, subkey|None, value, expiration, in_cache], ...]}
                                               -> {node, ok: [bool, ...]}
    dht.find   {node, keys: [key_id, ...]}     -> {node, results: [[record|None, nearest], ...]}
          record  = [expiration, value] | [expiration, None, [[subkey, value, expiration], ...]]
          nearest = [[node_id, peer_id, [maddr, ...]], ...]   (up to bucket_size, requester excluded)
    dht.peers  {}                              -> {node, peers: [[node_id, peer_id, [maddr, ...], age_s], ...]}

Anything malformed in a response counts as a failure of that peer; anything malformed in a
request is answered with an error naming the field.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from hivecli._exceptions import (
    ConfigError,
    ConnectionClosedError,
    HandshakeError,
    MalformedFrameError,
    PeerUnreachableError,
    ResourceExhaustedError,
    RPCError,
)
from hivecli.dht.routing import DHTID, RoutingTable
from hivecli.dht.settings import DHTSettings
from hivecli.dht.storage import LocalStorage, Record, merge_records
from hivecli.net.connection import Connection
from hivecli.net.host import Host
from hivecli.net.identity import PeerID
from hivecli.net.multiaddr import Multiaddr
from hivecli.utils.timing import get_dht_time

logger = logging.getLogger(__name__)

MAX_ITEMS_PER_REQUEST = 1024
_ADDRS_PER_NODE = 4


class Blacklist:
    """Peers that recently failed to answer, skipped by lookups with exponential back-off."""

    def __init__(self, base_time: float, backoff_rate: float, max_time: float):
        self.base_time, self.backoff_rate, self.max_time = base_time, backoff_rate, max_time
        self._banned: dict[PeerID, tuple[float, int]] = {}  # peer -> (banned until, failures)

    def register_failure(self, peer: PeerID) -> None:
        _, failures = self._banned.get(peer, (0.0, 0))
        ban = min(self.base_time * self.backoff_rate**failures, self.max_time)
        self._banned[peer] = (time.monotonic() + ban, failures + 1)

    def register_success(self, peer: PeerID) -> None:
        self._banned.pop(peer, None)

    def is_banned(self, peer: PeerID) -> bool:
        entry = self._banned.get(peer)
        return entry is not None and entry[0] > time.monotonic()

    def __len__(self) -> int:
        now = time.monotonic()
        return sum(1 for until, _ in self._banned.values() if until > now)


def _node_id_or_none(raw: Any) -> DHTID | None:
    return None if raw is None else DHTID.from_bytes_(raw)


def encode_record(record: Record) -> list[Any]:
    if record.subkeys is None:
        return [record.expiration_time, record.value]
    return [record.expiration_time, None, [[sub, value, exp] for sub, (value, exp) in record.subkeys.items()]]


def decode_record(raw: Any) -> Record:
    """Parse a record from the wire. Raises ValueError naming what is wrong."""
    if not isinstance(raw, list) or len(raw) not in (2, 3) or not isinstance(raw[0], (int, float)):
        raise ValueError(f"record {str(raw)[:60]} is not [expiration, value(, entries)]")
    if len(raw) == 2:
        if not isinstance(raw[1], bytes):
            raise ValueError("record value must be bytes")
        return Record(raw[1], float(raw[0]))
    subkeys: dict[bytes, tuple[bytes, float]] = {}
    for entry in raw[2]:
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or not isinstance(entry[0], bytes)
            or not isinstance(entry[1], bytes)
            or not isinstance(entry[2], (int, float))
        ):
            raise ValueError("dictionary entries must be [subkey, value, expiration]")
        subkeys[entry[0]] = (entry[1], float(entry[2]))
    if not subkeys:
        raise ValueError("a dictionary record has no entries")
    return Record(None, max(exp for _, exp in subkeys.values()), subkeys)


class DHTProtocol:
    """Serves the DHT methods on a Host and calls them on other peers, keeping the routing
    table up to date with everyone it hears from."""

    def __init__(self, host: Host, node_id: DHTID, settings: DHTSettings, client_mode: bool):
        self.host = host
        self.node_id = node_id
        self.settings = settings
        self.client_mode = client_mode
        self.routing_table = RoutingTable(node_id, settings.bucket_size, settings.depth_modulo)
        self.storage = LocalStorage(settings.max_records)
        self.cache = LocalStorage(settings.max_records)
        self.blacklist = Blacklist(settings.blacklist_time, settings.backoff_rate, settings.max_blacklist_time)
        self.last_seen: dict[DHTID, float] = {}  # monotonic time of the last answer or request
        self.on_new_node: Callable[[DHTID, PeerID], None] = lambda node_id, peer: None
        self.on_node_removed: Callable[[DHTID], None] = lambda node_id: None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wire_id = None if client_mode else node_id.to_bytes_()
        if not client_mode:
            host.add_inline_handler("dht.ping", self._rpc_ping)
            host.add_inline_handler("dht.store", self._rpc_store)
            host.add_inline_handler("dht.find", self._rpc_find)
        host.add_inline_handler("dht.peers", self._rpc_peers)

    # ---- routing-table upkeep -------------------------------------------------------------

    def _saw_node(self, node_id: DHTID | None, peer: PeerID) -> None:
        if node_id is None or node_id == self.node_id:
            return
        is_new = node_id not in self.routing_table
        stale = self.routing_table.add_or_update(node_id, peer)
        if node_id in self.routing_table:
            self.last_seen[node_id] = time.monotonic()
            if is_new:
                self.on_new_node(node_id, peer)
        if stale is not None:  # bucket full: the newcomer replaces the stale node if it is dead
            stale_peer = self.routing_table.node_to_peer.get(stale)
            if stale_peer is not None:
                self.spawn(self.call_ping(stale_peer))

    def _lost_peer(self, peer: PeerID) -> None:
        self.blacklist.register_failure(peer)
        node_id = self.routing_table.peer_to_node.get(peer)
        if node_id is not None and self.routing_table.remove(node_id):
            self.last_seen.pop(node_id, None)
            self.on_node_removed(node_id)

    def spawn(self, awaitable: Any) -> None:
        """Run a coroutine (or own a task) in the background until done or until `aclose`."""
        task = awaitable if isinstance(awaitable, asyncio.Future) else asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _sender(self, conn: Connection, payload: Any) -> dict[str, Any]:
        if not isinstance(payload, dict):
            raise ConfigError("a DHT request must be a map")
        try:
            self._saw_node(_node_id_or_none(payload.get("node")), conn.remote_peer)
        except ValueError as e:
            raise ConfigError(f"bad 'node' field: {e}") from None
        return payload

    # ---- serving --------------------------------------------------------------------------

    def _rpc_ping(self, conn: Connection, payload: Any, body: bytes) -> dict[str, Any]:
        self._sender(conn, payload)
        return {"node": self._wire_id, "time": get_dht_time()}

    def _rpc_store(self, conn: Connection, payload: Any, body: bytes) -> dict[str, Any]:
        items = self._sender(conn, payload).get("items")
        if not isinstance(items, list) or len(items) > MAX_ITEMS_PER_REQUEST:
            raise ConfigError(f"'items' must be a list of at most {MAX_ITEMS_PER_REQUEST} entries")
        ok = []
        for item in items:
            if (
                not isinstance(item, list)
                or len(item) != 5
                or not isinstance(item[2], bytes)
                or not isinstance(item[3], (int, float))
                or not isinstance(item[1], (bytes, type(None)))
            ):
                raise ConfigError("each store item must be [key_id, subkey|None, value, expiration, in_cache]")
            try:
                key_id = DHTID.from_bytes_(item[0])
            except ValueError as e:
                raise ConfigError(str(e)) from None
            target = self.cache if item[4] else self.storage
            ok.append(target.store(key_id, item[2], float(item[3]), item[1]))
        return {"node": self._wire_id, "ok": ok}

    def _rpc_find(self, conn: Connection, payload: Any, body: bytes) -> dict[str, Any]:
        request = self._sender(conn, payload)
        keys = request.get("keys")
        if not isinstance(keys, list) or len(keys) > MAX_ITEMS_PER_REQUEST:
            raise ConfigError(f"'keys' must be a list of at most {MAX_ITEMS_PER_REQUEST} key IDs")
        requester = self.routing_table.peer_to_node.get(conn.remote_peer)
        results = []
        for raw_key in keys:
            try:
                key_id = DHTID.from_bytes_(raw_key)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            record = merge_records(self.storage.get(key_id), self.cache.get(key_id))
            nearest = [
                [node_id.to_bytes_(), peer.to_bytes(), self._addrs_of(peer)]
                for node_id, peer in self.routing_table.nearest(key_id, self.settings.bucket_size, exclude=requester)
            ]
            results.append([encode_record(record) if record is not None else None, nearest])
        return {"node": self._wire_id, "results": results}

    def _rpc_peers(self, conn: Connection, payload: Any, body: bytes) -> dict[str, Any]:
        now = time.monotonic()
        peers = [
            [
                node_id.to_bytes_(),
                peer.to_bytes(),
                self._addrs_of(peer),
                now - self.last_seen.get(node_id, now),
            ]
            for node_id, peer in self.routing_table
        ]
        return {"node": self._wire_id, "peers": peers}

    def _addrs_of(self, peer: PeerID) -> list[str]:
        return [m.transport_address for m in self.host.address_book.get(peer, [])[:_ADDRS_PER_NODE]]

    # ---- calling --------------------------------------------------------------------------

    async def request(
        self, peer: PeerID | Multiaddr, method: str, payload: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        """Call `method` on `peer` (dialing if needed) and learn the responder's node ID.

        Raises:
            asyncio.TimeoutError: no connection or no answer within `timeout` (default: wait_timeout).
            PeerUnreachableError, HandshakeError, RPCError, ConnectionClosedError,
            ResourceExhaustedError: as `Host.connect` and `Connection.call` raise them.
            MalformedFrameError, ValueError: the answer is not a valid DHT response.
        """
        peer_id = peer.peer_id if isinstance(peer, Multiaddr) else peer
        assert peer_id is not None
        timeout = self.settings.wait_timeout if timeout is None else timeout
        payload["node"] = self._wire_id
        conn = self.host.connection_to(peer_id) or await asyncio.wait_for(self.host.connect(peer), timeout)
        response = (await conn.call(method, payload, timeout=timeout)).payload
        if not isinstance(response, dict):
            raise MalformedFrameError(f"{method} response is not a map")
        self._saw_node(_node_id_or_none(response.get("node")), peer_id)
        return response

    async def _call(self, peer: PeerID | Multiaddr, method: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        """`request`, but None (and the peer is marked as failed) if it did not work."""
        peer_id = peer.peer_id if isinstance(peer, Multiaddr) else peer
        assert peer_id is not None
        try:
            response = await self.request(peer, method, payload)
        except ResourceExhaustedError as e:
            logger.warning("%s to %s not sent: %s", method, peer_id, e)  # our problem, not the peer's
            return None
        except (
            PeerUnreachableError,
            HandshakeError,
            RPCError,
            ConnectionClosedError,
            asyncio.TimeoutError,
            MalformedFrameError,
            ValueError,
        ) as e:
            logger.debug("%s to %s failed: %s", method, peer_id, e or type(e).__name__)
            self._lost_peer(peer_id)
            return None
        self.blacklist.register_success(peer_id)
        return response

    async def call_ping(self, peer: PeerID | Multiaddr) -> dict[str, Any] | None:
        return await self._call(peer, "dht.ping", {})

    async def call_store(self, peer: PeerID, items: list[list[Any]]) -> list[bool] | None:
        response = await self._call(peer, "dht.store", {"items": items})
        ok = None if response is None else response.get("ok")
        if not isinstance(ok, list) or len(ok) != len(items):
            return None
        return [bool(x) for x in ok]

    async def call_find(
        self, peer: PeerID, key_ids: list[DHTID]
    ) -> list[tuple[Record | None, list[tuple[DHTID, PeerID]]]] | None:
        """Ask `peer` for records and nearest nodes. Learns the addresses of the nodes it names."""
        response = await self._call(peer, "dht.find", {"keys": [k.to_bytes_() for k in key_ids]})
        if response is None:
            return None
        try:
            results = response["results"]
            if not isinstance(results, list) or len(results) != len(key_ids):
                raise ValueError("wrong number of results")
            parsed = []
            for raw_record, raw_nearest in results:
                record = None if raw_record is None else decode_record(raw_record)
                nearest = []
                for node_bytes, peer_bytes, addrs in raw_nearest[: self.settings.bucket_size]:
                    node_peer = PeerID(peer_bytes)
                    nearest.append((DHTID.from_bytes_(node_bytes), node_peer))
                    self.host.add_addrs(node_peer, _parse_addrs(addrs))
                parsed.append((record, nearest))
            return parsed
        except (ValueError, TypeError, KeyError) as e:
            logger.debug("Malformed dht.find response from %s: %s", peer, e)
            self._lost_peer(peer)
            return None

    async def call_peers(self, peer: PeerID | Multiaddr) -> list[dict[str, Any]] | None:
        response = await self._call(peer, "dht.peers", {})
        if response is None:
            return None
        peers = []
        for node_bytes, peer_bytes, addrs, age in response.get("peers") or []:
            peers.append(
                {
                    "node_id": node_bytes,
                    "peer_id": PeerID(peer_bytes),
                    "maddrs": _parse_addrs(addrs),
                    "last_seen_s": float(age),
                }
            )
        return peers


def _parse_addrs(addrs: Any) -> list[Multiaddr]:
    parsed = []
    for text in addrs[:_ADDRS_PER_NODE] if isinstance(addrs, list) else []:
        try:
            parsed.append(Multiaddr.parse(text))
        except ConfigError:
            continue
    return parsed
