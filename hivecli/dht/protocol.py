"""The DHT's wire protocol: what a node serves and how it calls others.

Every request and response carries `node`: the sender's 20-byte DHT ID, or None for a client
(which is never added to routing tables). The first node ID a peer presents sticks to it: a
later different one from the same peer is ignored unless it comes over a new connection at
least a minute later (a restart). Methods:

    dht.ping   {node}                          -> {node, time}
    dht.store  {node, items: [[key_id, subkey|None, value, expiration, in_cache(, signature)], ...]}
                                               -> {node, ok: [bool, ...]}
    dht.find   {node, keys: [key_id, ...]}     -> {node, results: [[record|None, nearest], ...](, omitted)}
          record  = [expiration, value] | [expiration, None, [[subkey, value, expiration(, signature)], ...]]
          nearest = [[node_id, peer_id, [maddr, ...]], ...]   (up to bucket_size, requester excluded)
          omitted = [index, ...]: keys whose record was left out to keep the reply within
                    max_reply_bytes (ask for them again, alone); a repeated key gets [None, []]
    dht.peers  {}                              -> {node, peers: [[node_id, peer_id, [maddr, ...], age_s], ...]}

`signature` (optional, Ed25519, 64 bytes) is required for, and only meaningful on, owned
subkeys (see `hivecli.dht.records`); nodes check it on every store and readers on every find
result. A store request holds at most 1024 items; senders split larger batches.

Anything malformed or forged in a response counts as a failure of that peer; anything
malformed in a request is answered with an error naming the field.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

from hivecli._exceptions import (
    ConfigError,
    ConnectionClosedError,
    HandshakeError,
    MalformedFrameError,
    PeerUnreachableError,
    ResourceExhaustedError,
    RPCError,
    RPCTimeoutError,
)
from hivecli.dht.records import ENTRY_OVERHEAD, decode_record, encode_record, entry_is_authentic, record_bytes
from hivecli.dht.routing import DHTID, RoutingTable
from hivecli.dht.settings import DHTSettings
from hivecli.dht.storage import LocalStorage, Record, merge_records
from hivecli.net.connection import Connection
from hivecli.net.host import Host
from hivecli.net.identity import PeerID
from hivecli.net.multiaddr import Multiaddr
from hivecli.utils.loops import timeout as _timeout
from hivecli.utils.timing import get_dht_time

logger = logging.getLogger(__name__)

MAX_ITEMS_PER_REQUEST = 1024
MAX_SIGNED_ITEMS_PER_REQUEST = 64  # each costs a ~100 us signature check in the read loop
_ADDRS_PER_NODE = 4
_REBIND_AFTER_S = 60.0  # a peer may present a new node ID (a restart) this long after the last
_MAX_BINDINGS = 16384  # peer -> node ID bindings remembered (least recently seen forgotten first)
_MAX_BLACKLIST = 16384  # peers remembered by the blacklist
_MAX_REMOVED = 64  # peers dropped from the routing table whose addresses are kept to re-join through
_MAX_UNANSWERED = 1024  # busy connections remembered for leaving a request unanswered


class Blacklist:
    """Peers that recently failed, skipped by lookups with exponential back-off.

    A failure is either silence (no connection, no answer in time: the peer may be down, or the
    network between us) or misbehaviour (an answer that is malformed, forged or an error). Only
    silence can be the network's fault: `forgive_silent` lifts those bans alone.
    """

    def __init__(self, base_time: float, backoff_rate: float, max_time: float):
        self.base_time, self.backoff_rate, self.max_time = base_time, backoff_rate, max_time
        # past this many failures the ban is max_time anyway: capping the exponent keeps
        # backoff_rate ** failures from overflowing after a peer failed a thousand times
        if backoff_rate > 1 and 0 < base_time < max_time:
            self._max_exponent = math.ceil(math.log(max_time / base_time, backoff_rate))
        else:
            self._max_exponent = 0
        self._banned: OrderedDict[PeerID, tuple[float, int]] = OrderedDict()  # peer -> (until, failures)
        self._misbehaved: set[PeerID] = set()  # banned peers whose latest failure was an answer, not silence

    def register_failure(self, peer: PeerID, misbehaved: bool = False) -> None:
        _, failures = self._banned.pop(peer, (0.0, 0))
        ban = min(self.base_time * self.backoff_rate ** min(failures, self._max_exponent), self.max_time)
        self._banned[peer] = (time.monotonic() + ban, min(failures + 1, self._max_exponent + 1))
        if misbehaved:
            self._misbehaved.add(peer)
        else:
            self._misbehaved.discard(peer)
        if len(self._banned) > _MAX_BLACKLIST:
            oldest, _ = self._banned.popitem(last=False)  # the longest unbanned is the least useful to remember
            self._misbehaved.discard(oldest)

    def register_success(self, peer: PeerID) -> None:
        self._banned.pop(peer, None)
        self._misbehaved.discard(peer)

    def forgive_silent(self) -> None:
        """Lift every ban for silence: after this node was cut off, the silence was probably ours."""
        for peer in [peer for peer in self._banned if peer not in self._misbehaved]:
            del self._banned[peer]

    def misbehaved(self, peer: PeerID) -> bool:
        """Whether `peer` is banned now for a bad answer (not for silence)."""
        return peer in self._misbehaved and self.is_banned(peer)

    def silent(self, peer: PeerID) -> bool:
        """Whether `peer` is banned now for not answering."""
        return peer not in self._misbehaved and self.is_banned(peer)

    def is_banned(self, peer: PeerID) -> bool:
        entry = self._banned.get(peer)
        return entry is not None and entry[0] > time.monotonic()

    def __len__(self) -> int:
        now = time.monotonic()
        return sum(1 for until, _ in self._banned.values() if until > now)


class FindResult(NamedTuple):
    """What one node said about one key: its record (None: none, or `omitted`) and nearest nodes."""

    record: Record | None
    nearest: list[tuple[DHTID, PeerID]]
    omitted: bool = False  # the node has a record but left it out of a full reply


def _node_id_or_none(raw: Any) -> DHTID | None:
    return None if raw is None else DHTID.from_bytes_(raw)


def _is_time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _storage(settings: DHTSettings) -> LocalStorage:
    return LocalStorage(
        settings.max_records,
        max_bytes=settings.max_bytes,
        max_record_bytes=settings.max_record_bytes,
        max_value_bytes=settings.max_value_bytes,
        max_expiration=settings.max_expiration,
        peer_quota=settings.peer_quota,
    )


class DHTProtocol:
    """Serves the DHT methods on a Host and calls them on other peers, keeping the routing
    table up to date with everyone it hears from."""

    def __init__(self, host: Host, node_id: DHTID, settings: DHTSettings, client_mode: bool):
        self.host = host
        self.node_id = node_id
        self.settings = settings
        self.client_mode = client_mode
        self.routing_table = RoutingTable(node_id, settings.bucket_size, settings.depth_modulo)
        self.storage = _storage(settings)
        self.cache = _storage(settings)
        self.blacklist = Blacklist(settings.blacklist_time, settings.backoff_rate, settings.max_blacklist_time)
        self.last_seen: dict[DHTID, float] = {}  # monotonic time of the last answer or request
        self.on_new_node: Callable[[DHTID, PeerID], None] = lambda node_id, peer: None
        self.on_node_removed: Callable[[DHTID], None] = lambda node_id: None
        # How well we reach others, for telling a node cut off from the network: every valid answer
        # resets `silent_failures` (requests in a row that got no answer at all) and calls on_answer.
        self.last_answer = time.monotonic()  # monotonic time of the latest valid answer
        self.last_answer_peer: PeerID | None = None
        self.silent_failures = 0
        self.on_answer: Callable[[PeerID], None] = lambda peer: None
        self.on_silence: Callable[[], None] = lambda: None
        # peer -> addresses of nodes dropped from the routing table, newest last: after an outage
        # they are the likeliest way back in (the address book may hold thousands of peers)
        self.removed_peers: OrderedDict[PeerID, list[Multiaddr]] = OrderedDict()
        # peer -> a connection that left a request of ours unanswered but was busy, so left open
        self._unanswered: OrderedDict[PeerID, Connection] = OrderedDict()
        # peer -> (the node ID it first presented, the connection it came over, when)
        self._bindings: OrderedDict[PeerID, tuple[DHTID, Connection | None, float]] = OrderedDict()
        self._pinging: set[PeerID] = set()  # nodes being checked, so each is pinged once at a time
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wire_id: bytes | None = None
        self.set_client_mode(client_mode)
        host.add_inline_handler("dht.peers", self._rpc_peers)

    def set_client_mode(self, client_mode: bool) -> None:
        """Serve the DHT (False) or only use it (True: others get "unknown method" and drop us
        from their routing tables). A peer found unreachable switches to client mode."""
        self.client_mode = client_mode
        self._wire_id = None if client_mode else self.node_id.to_bytes_()
        serving = {"dht.ping": self._rpc_ping, "dht.store": self._rpc_store, "dht.find": self._rpc_find}
        for method, handler in serving.items():
            if client_mode:
                self.host.handlers.inline.pop(method, None)
            else:
                self.host.add_inline_handler(method, handler)

    # ---- routing-table upkeep -------------------------------------------------------------

    def _bind(self, node_id: DHTID, peer: PeerID, conn: Connection | None) -> DHTID:
        """The node ID to route `peer` by: the first it presented, unless this is a restart."""
        now = time.monotonic()
        bound = self._bindings.pop(peer, None)
        if bound is not None and bound[0] != node_id:
            bound_id, bound_conn, since = bound
            # Rotating node IDs would make every request look like a newcomer to hand our storage
            # to; only a new connection a while later (the peer restarted) may change it.
            if conn is None or conn is bound_conn or now - since < _REBIND_AFTER_S:
                self._bindings[peer] = bound
                return bound_id
            if self.routing_table.remove(bound_id):
                self.last_seen.pop(bound_id, None)
                self.on_node_removed(bound_id)
            bound = None
        self._bindings[peer] = bound if bound is not None else (node_id, conn, now)
        if len(self._bindings) > _MAX_BINDINGS:
            self._bindings.popitem(last=False)
        return node_id

    def _saw_node(self, node_id: DHTID | None, peer: PeerID, conn: Connection | None = None) -> None:
        if node_id is None or node_id == self.node_id:
            return
        node_id = self._bind(node_id, peer, conn)
        is_new = node_id not in self.routing_table
        stale = self.routing_table.add_or_update(node_id, peer)
        if node_id in self.routing_table:
            self.last_seen[node_id] = time.monotonic()
            if is_new:
                self.on_new_node(node_id, peer)
        if stale is not None:  # bucket full: the newcomer replaces the stale node if it is dead
            stale_peer = self.routing_table.node_to_peer.get(stale)
            if stale_peer is not None:
                self._check_alive(stale_peer)

    def _check_alive(self, peer: PeerID) -> None:
        """Ping `peer` in the background (unless a check is under way): an answer lifts its ban,
        silence drops it from the table."""
        if peer not in self._pinging:
            self._pinging.add(peer)
            self.spawn(self._ping_to_check(peer))

    async def _ping_to_check(self, peer: PeerID) -> None:
        try:
            await self.call_ping(peer)
        finally:
            self._pinging.discard(peer)

    def _lost_peer(self, peer: PeerID, misbehaved: bool = False) -> None:
        """`peer` failed a request: ban it for a while and drop it from the routing table.
        `misbehaved`: it answered, wrongly (else it did not answer at all)."""
        self.blacklist.register_failure(peer, misbehaved)
        self._bindings.pop(peer, None)
        node_id = self.routing_table.peer_to_node.get(peer)
        if node_id is not None and self.routing_table.remove(node_id):
            self.last_seen.pop(node_id, None)
            if not misbehaved:
                self.removed_peers.pop(peer, None)
                self.removed_peers[peer] = list(self.host.address_book.get(peer, []))
                if len(self.removed_peers) > _MAX_REMOVED:
                    self.removed_peers.popitem(last=False)
            self.on_node_removed(node_id)
        if not misbehaved:
            self.silent_failures += 1
            self.on_silence()

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
        silent = self._unanswered.pop(conn.remote_peer, None)
        if silent is not None and silent is not conn:
            # It dialed us anew, so its end of the link that left us unanswered is gone (it closed
            # it, or restarted): our end would only swallow requests until TCP gives up.
            silent.close("the peer reconnected; this link had left a request unanswered")
        if self.blacklist.silent(conn.remote_peer):
            # A peer we banned for not answering reaches us (say, across a partition that has
            # healed): if it answers us too, our lookups may ask it again now, not minutes later.
            # Checked, not believed: a peer that only sends would keep itself in our lookups.
            self._check_alive(conn.remote_peer)
        try:
            self._saw_node(_node_id_or_none(payload.get("node")), conn.remote_peer, conn)
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
        signed = sum(1 for item in items if isinstance(item, list) and len(item) == 6 and item[5] is not None)
        if signed > MAX_SIGNED_ITEMS_PER_REQUEST:  # checks run in the read loop: bound them per request
            raise ConfigError(
                f"a store request may carry at most {MAX_SIGNED_ITEMS_PER_REQUEST} signed items, not {signed}; split it"
            )
        parsed = []
        for item in items:  # all checked before any is applied: a malformed request changes nothing
            if (
                not isinstance(item, list)
                or len(item) not in (5, 6)
                or not isinstance(item[1], (bytes, type(None)))
                or not isinstance(item[2], bytes)
                or not _is_time(item[3])
                or (len(item) == 6 and not isinstance(item[5], (bytes, type(None))))
            ):
                raise ConfigError(
                    "each store item must be [key_id, subkey|None, value, expiration, in_cache(, signature)]"
                )
            try:
                key_id = DHTID.from_bytes_(item[0])
            except ValueError as e:
                raise ConfigError(str(e)) from None
            parsed.append((key_id, item))
        ok = []
        for key_id, item in parsed:
            if item[4] and item[1] is None and self.storage.has_owned(key_id):
                ok.append(False)  # a cached regular value must not shadow owned subkeys we hold either
                continue
            target = self.cache if item[4] else self.storage
            signature = item[5] if len(item) == 6 else None
            ok.append(target.store(key_id, item[2], float(item[3]), item[1], signature, payer=conn.remote_peer))
        return {"node": self._wire_id, "ok": ok}

    def _rpc_find(self, conn: Connection, payload: Any, body: bytes) -> dict[str, Any]:
        request = self._sender(conn, payload)
        keys = request.get("keys")
        if not isinstance(keys, list) or len(keys) > MAX_ITEMS_PER_REQUEST:
            raise ConfigError(f"'keys' must be a list of at most {MAX_ITEMS_PER_REQUEST} key IDs")
        try:
            key_ids = [DHTID.from_bytes_(raw_key) for raw_key in keys]
        except ValueError as e:
            raise ConfigError(str(e)) from None
        requester = self.routing_table.peer_to_node.get(conn.remote_peer)
        budget = self.settings.max_reply_bytes
        answered: set[DHTID] = set()
        results: list[list[Any]] = []
        omitted: list[int] = []
        for index, key_id in enumerate(key_ids):
            if key_id in answered or budget <= 0:
                # a repeated key was answered already; past the budget, nothing more fits
                results.append([None, []])
                if key_id not in answered:
                    omitted.append(index)
                continue
            answered.add(key_id)
            nearest = [
                [node_id.to_bytes_(), peer.to_bytes(), self._addrs_of(peer)]
                for node_id, peer in self.routing_table.nearest(key_id, self.settings.bucket_size, exclude=requester)
            ]
            budget -= sum(ENTRY_OVERHEAD + len(peer) + sum(len(a) + 2 for a in addrs) for _, peer, addrs in nearest)
            stored = self.storage.get(key_id)
            encoded = None
            # storage and cache may each hold a full record; if both do not fit, the replica's own does
            for record in (merge_records(stored, self.cache.get(key_id)), stored):
                if record is not None and record_bytes(record) <= budget:
                    budget -= record_bytes(record)
                    encoded = encode_record(record)
                    break
            else:
                if stored is not None or key_id in self.cache:
                    omitted.append(index)
            results.append([encoded, nearest])
        response: dict[str, Any] = {"node": self._wire_id, "results": results}
        if omitted:
            response["omitted"] = omitted
        return response

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

        A connection that carried nothing else and got no answer in time is closed: after a
        network outage, TCP retransmits on a timer that has backed off to seconds or minutes, so
        the old link may stay silent long after the network is back, while a new one connects
        at once.

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
        conn = self.host.connection_to(peer_id)
        if conn is None:
            async with _timeout(timeout):  # in this task: a connect failing after we gave up leaves no orphan
                conn = await self.host.connect(peer)
        asked = asyncio.get_running_loop().time()
        try:
            response = (await conn.call(method, payload, timeout=timeout)).payload
        except RPCTimeoutError:
            if not conn.silent_since(asked):
                raise  # the link carries other traffic: the peer is slow (a busy machine), not gone
            # DHT methods are answered in the peer's read loop, so silence means a dead link or
            # peer; a busy connection (a transfer in flight) is left alone, as it may just be full
            if not conn.busy:
                conn.close(f"no answer to {method} within {timeout:g} s")
            else:
                self._unanswered.pop(peer_id, None)
                self._unanswered[peer_id] = conn
                if len(self._unanswered) > _MAX_UNANSWERED:
                    self._unanswered.popitem(last=False)
            raise
        if not isinstance(response, dict):
            raise MalformedFrameError(f"{method} response is not a map")
        self._saw_node(_node_id_or_none(response.get("node")), peer_id, conn)
        if self._unanswered.get(peer_id) is conn:
            del self._unanswered[peer_id]
        self.last_answer, self.last_answer_peer, self.silent_failures = time.monotonic(), peer_id, 0
        self.on_answer(peer_id)
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
        except (PeerUnreachableError, ConnectionClosedError, RPCTimeoutError, asyncio.TimeoutError) as e:  # silence
            logger.debug("%s to %s failed: %s", method, peer_id, e or type(e).__name__)
            self._lost_peer(peer_id)
            return None
        except (HandshakeError, RPCError, MalformedFrameError, ValueError) as e:  # a wrong answer
            logger.debug("%s to %s failed: %s", method, peer_id, e or type(e).__name__)
            self._lost_peer(peer_id, misbehaved=True)
            return None
        self.blacklist.register_success(peer_id)
        return response

    async def call_ping(self, peer: PeerID | Multiaddr) -> dict[str, Any] | None:
        return await self._call(peer, "dht.ping", {})

    async def call_store(self, peer: PeerID, items: list[list[Any]]) -> list[bool] | None:
        """Send store items, split into requests of at most MAX_ITEMS_PER_REQUEST items (of them
        at most MAX_SIGNED_ITEMS_PER_REQUEST signed) and about max_reply_bytes each. Returns one
        bool per item, or None if any request failed."""
        ok: list[bool] = []
        start = 0
        while start < len(items):
            end, size, signed = start, 0, 0
            while end < len(items) and end - start < MAX_ITEMS_PER_REQUEST:
                item_size = ENTRY_OVERHEAD + sum(len(x) for x in items[end] if isinstance(x, bytes))
                is_signed = len(items[end]) == 6 and items[end][5] is not None
                if end > start and (
                    size + item_size > self.settings.max_reply_bytes
                    or signed + is_signed > MAX_SIGNED_ITEMS_PER_REQUEST
                ):
                    break
                size, signed = size + item_size, signed + is_signed
                end += 1
            response = await self._call(peer, "dht.store", {"items": items[start:end]})
            answer = None if response is None else response.get("ok")
            if not isinstance(answer, list) or len(answer) != end - start:
                return None
            ok.extend(bool(x) for x in answer)
            start = end
        return ok

    async def call_find(self, peer: PeerID, key_ids: list[DHTID]) -> list[FindResult] | None:
        """Ask `peer` for records and nearest nodes. Learns the addresses of the nodes it names.

        Returns None (and marks the peer as failed) if the reply is malformed or carries an
        owned entry whose signature does not verify. Keys whose records the peer left out of a
        full reply are asked for again one at a time; a record too big even alone comes back
        as `omitted`.
        """
        response = await self._call(peer, "dht.find", {"keys": [k.to_bytes_() for k in key_ids]})
        if response is None:
            return None
        try:
            parsed = self._parse_find(response, key_ids)
        except (ValueError, TypeError, KeyError) as e:
            logger.warning("Ignoring peer %s: bad dht.find reply: %s", peer, e)
            self._lost_peer(peer, misbehaved=True)
            return None
        if len(key_ids) > 1:
            for index, result in enumerate(parsed):
                if result.omitted:
                    again = await self.call_find(peer, [key_ids[index]])
                    if again is None:
                        return None
                    parsed[index] = again[0]
        return parsed

    def _parse_find(self, response: dict[str, Any], key_ids: list[DHTID]) -> list[FindResult]:
        """Raises ValueError, TypeError or KeyError for anything malformed or forged."""
        results = response["results"]
        if not isinstance(results, list) or len(results) != len(key_ids):
            raise ValueError("wrong number of results")
        omitted = response.get("omitted") or []
        if not isinstance(omitted, list) or not all(isinstance(i, int) for i in omitted):
            raise ValueError("'omitted' must be a list of indices")
        parsed = []
        for key_id, (raw_record, raw_nearest) in zip(key_ids, results, strict=True):
            record = None if raw_record is None else decode_record(raw_record)
            if record is not None and record.subkeys is not None:
                key_bytes = key_id.to_bytes_()
                for subkey, entry in record.subkeys.items():
                    if not entry_is_authentic(key_bytes, subkey, entry):
                        raise ValueError(f"subkey {subkey[:40]!r} carries a forged or missing owner signature")
            nearest = []
            for node_bytes, peer_bytes, addrs in raw_nearest[: self.settings.bucket_size]:
                node_peer = PeerID(peer_bytes)
                nearest.append((DHTID.from_bytes_(node_bytes), node_peer))
                self.host.add_addrs(node_peer, _parse_addrs(addrs))
            parsed.append(FindResult(record, nearest))
        for index in omitted:
            if 0 <= index < len(parsed) and parsed[index].record is None:
                parsed[index] = parsed[index]._replace(omitted=True)
        return parsed

    async def call_peers(self, peer: PeerID | Multiaddr) -> list[dict[str, Any]] | None:
        """The routing table `peer` reports, or None if it did not answer sensibly."""
        response = await self._call(peer, "dht.peers", {})
        if response is None:
            return None
        peers = []
        try:
            for node_bytes, peer_bytes, addrs, age in response.get("peers") or []:
                peers.append(
                    {
                        "node_id": node_bytes,
                        "peer_id": PeerID(peer_bytes),
                        "maddrs": _parse_addrs(addrs),
                        "last_seen_s": float(age),
                    }
                )
        except (ValueError, TypeError) as e:
            logger.warning("Ignoring peer %s: bad dht.peers reply: %s", peer, e)
            return None
        return peers


def _parse_addrs(addrs: Any) -> list[Multiaddr]:
    parsed = []
    for text in addrs[:_ADDRS_PER_NODE] if isinstance(addrs, list) else []:
        try:
            parsed.append(Multiaddr.parse(text))
        except ConfigError:
            continue
    return parsed
