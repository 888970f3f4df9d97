"""A Host is one peer on the network: its identity, listeners, handlers and connection pool.

Callers address peers by PeerID; the host remembers where each peer listens (its address
book), dials on demand, reuses the open connection for every later call, and closes links
that have been idle for `NetSettings.idle_timeout`.

It also bounds what strangers can make it hold: inbound sockets still in the handshake
(`max_pending_handshakes`) and authenticated connections, in all and per peer ID
(`max_connections`, `max_connections_per_peer`). At a cap the least recently active idle
connection makes room; when all are busy the new one is refused. A node that runs out of file
descriptors cannot accept anyone, so a cap below the descriptor limit keeps it reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import time
from typing import Any

from hivecli._exceptions import (
    ConfigError,
    ConnectionClosedError,
    HandshakeError,
    HiveError,
    PeerUnreachableError,
    ResourceExhaustedError,
)
from hivecli.net.bulk import BulkLinks
from hivecli.net.connection import (
    Connection,
    EndOfStream,
    Handlers,
    InlineHandler,
    Kind,
    Message,
    NetSettings,
    SinkSetup,
    StreamHandlerFn,
    UnaryHandler,
)
from hivecli.net.framing import encode_frame
from hivecli.net.handshake import Diverted, perform_handshake
from hivecli.net.identity import Identity, PeerID
from hivecli.net.interfaces import expand_unspecified, local_networks, select_addresses
from hivecli.net.limits import LimitLog
from hivecli.net.multiaddr import Multiaddr
from hivecli.net.reachability import UNKNOWN, UNREACHABLE, DialbackService, ReachabilityReport
from hivecli.net.relay import OK, RelayClient, RelayedStream, RelayService, accepted, peer_field
from hivecli.net.tcp import TCPTransport
from hivecli.net.transport import ByteStream, Listener, Transport
from hivecli.utils.loops import timeout as _timeout

logger = logging.getLogger(__name__)

_MAX_ADDRS_PER_PEER = 16
_VISIBLE_ADDRS_TTL = 5.0
OFFENCE_WINDOW = 60.0  # seconds a connection dropped for breaking a limit counts against its IP
STALE_DIAL_S = 1.0  # a dial nobody waits for, older than Linux's first SYN resend, is not joined
_FD_RESERVE = 64  # descriptors left for listeners, files, pending handshakes and outbound dials


def default_max_connections() -> int:
    """min(1024, the soft RLIMIT_NOFILE - 64): the default for `NetSettings.max_connections`."""
    try:
        import resource  # Unix only
    except ImportError:  # pragma: no cover - Windows has no descriptor limit to read
        return 1024
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(1, min(1024, soft - _FD_RESERVE))


@dataclasses.dataclass
class _Dial:
    """A dial in progress, shared by every caller that wants a connection to its peer."""

    task: asyncio.Task[Connection]
    began: float  # loop time
    waiters: int = 0  # callers awaiting it now


class Host:
    """Identity + listeners + connection pool. Every method must run on one event loop."""

    def __init__(
        self,
        identity: Identity | None = None,
        transport: Transport | None = None,
        settings: NetSettings | None = None,
    ):
        self.identity = identity or Identity.generate()
        self.peer_id = self.identity.peer_id
        self.transport = transport or TCPTransport()
        settings = settings or NetSettings()
        if settings.max_connections is None:
            settings = dataclasses.replace(settings, max_connections=default_max_connections())
        self.settings = settings
        self.handlers = Handlers()
        self.address_book: dict[PeerID, list[Multiaddr]] = {}
        self.listen_maddrs: list[Multiaddr] = []
        self.announce_maddrs: list[Multiaddr] = []
        self._listeners: list[Listener] = []
        self._connections: dict[PeerID, Connection] = {}
        # every authenticated connection, in the order it joined the pool (a dict as an ordered
        # set: `_choose` breaks its last tie by that order)
        self._all_connections: dict[Connection, None] = {}
        self._dials: dict[PeerID, _Dial] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._janitor: asyncio.Task[None] | None = None
        self._direct: tuple[float, list[Multiaddr]] | None = None
        self._networks: tuple[float, list[Any]] | None = None
        self._pending_handshakes = 0
        self._offences: dict[str, list[float]] = {}  # remote IP -> when its connections broke limits
        self._limit_log = LimitLog(logger)
        self._connection_log = LimitLog(logging.getLogger(Connection.__module__))
        # whether others can dial us, and the relays that let them when they cannot
        self.reachability = ReachabilityReport(UNKNOWN)
        # serve=None: relay unless a dial-back found us unreachable (a peer alone in its swarm has
        # not been checked, and the first peer of a run is exactly who its NATed joiners need)
        self.relay = RelayService(settings.relay, enabled=settings.relay.serve is not False)
        self.relay_client = RelayClient(self.connect, self._relay_addresses)
        self.handlers.streaming["relay.reserve"] = self.relay.serve_reserve
        self.handlers.streaming["relay.connect"] = self.relay.serve_connect
        self.handlers.streaming["relay.incoming"] = self._accept_relayed
        self.handlers.unary["net.dialback"] = DialbackService(self).handle
        self.handlers.inline["net.info"] = self._net_info
        # transfers of tensor bytes on connections of their own, which peers redeem with a token
        self.bulk = BulkLinks(self.transport, settings.limits, settings.security.encrypt)

    # ---- serving ---------------------------------------------------------------------------

    def add_unary_handler(self, method: str, handler: UnaryHandler) -> None:
        self.handlers.unary[method] = handler

    def add_inline_handler(self, method: str, handler: InlineHandler) -> None:
        """Serve `method` with a plain function that must return at once (it runs in the read loop)."""
        self.handlers.inline[method] = handler

    def add_stream_handler(self, method: str, handler: StreamHandlerFn, sink_setup: SinkSetup | None = None) -> None:
        """Serve `method` with `handler` on a stream; `sink_setup` (see `Handlers`) may give the
        stream a body sink before the handler runs."""
        self.handlers.streaming[method] = handler
        if sink_setup is not None:
            self.handlers.sinks[method] = sink_setup
        else:
            self.handlers.sinks.pop(method, None)

    def remove_stream_handler(self, method: str) -> None:
        """Stop serving `method` (streams already open keep their handler)."""
        self.handlers.streaming.pop(method, None)
        self.handlers.sinks.pop(method, None)

    async def listen(self, maddrs: list[Multiaddr]) -> None:
        """Start accepting connections on each listen address (port 0 picks a free port).

        Raises:
            ConfigError: an address has a /p2p part or cannot be bound (in use, not ours).
        """
        for maddr in maddrs:
            if maddr.peer_id is not None:
                raise ConfigError(f"listen address {maddr} must not contain /p2p/...; drop that part")
            try:
                listener = await self.transport.listen(maddr.host, maddr.port, self._accept)
            except OSError as e:
                raise ConfigError(f"cannot listen on {maddr}: {e.strerror or e}; pick another port or host") from None
            self._listeners.append(listener)
            self._direct = None
            for host, port in listener.bound:
                bound = Multiaddr(maddr.protocol, host, port)
                if bound not in self.listen_maddrs:
                    self.listen_maddrs.append(bound)
        if self._janitor is None:
            self._janitor = asyncio.get_running_loop().create_task(self._close_idle_connections())

    def direct_maddrs(self) -> list[Multiaddr]:
        """The addresses we listen at (or were told to announce), without /p2p: every interface
        of a 0.0.0.0 listener, public first. Re-read at most every few seconds: every handshake
        sends a list made from them."""
        now = time.monotonic()
        if self._direct is None or now - self._direct[0] > _VISIBLE_ADDRS_TTL:
            self._direct = (now, self.announce_maddrs or expand_unspecified(self.listen_maddrs))
        return list(self._direct[1])

    def visible_maddrs(self, remote_host: str | None = None) -> list[Multiaddr]:
        """Addresses to give to other peers, each ending in /p2p/<our peer id>: only those the
        peer at `remote_host` can use (None: anyone, e.g. for the DHT or a printed join line).

        Never loopback to a remote peer; not our direct addresses to strangers once a dial-back
        found them unreachable (circuit addresses through our relays instead); those a dial-back
        confirmed first. See `interfaces.select_addresses`.
        """
        now = time.monotonic()
        if self._networks is None or now - self._networks[0] > _VISIBLE_ADDRS_TTL:
            self._networks = (now, local_networks())
        direct = self.direct_maddrs()
        confirmed = [m for m in self.reachability.reachable if m not in direct]
        chosen = select_addresses(
            confirmed + direct,
            self.relay_client.circuit_maddrs(),
            self.reachability,
            remote_host,
            self._networks[1],
        )
        return [m.with_peer_id(self.peer_id) for m in chosen]

    def set_reachability(self, report: ReachabilityReport) -> None:
        """Record a dial-back's verdict: it decides what we advertise, and (unless told otherwise
        by RelaySettings.serve) whether we relay for others, which only a reachable peer can."""
        self.reachability = report
        if self.settings.relay.serve is None:
            self.relay.enabled = report.status != UNREACHABLE

    def _net_info(self, conn: Connection, payload: Any, body: bytes) -> dict[str, Any]:
        """`net.info`: what `hive peers` shows of us: reachability, the relays we use, what we relay."""
        return {
            "reachability": self.reachability.status,
            "relays": [peer.to_bytes() for peer in self.relay_client.relays],
            "relay": self.relay.stats.to_wire() | {"serving": self.relay.enabled},
            "reserved": [peer.to_bytes() for peer in self.relay.reserved_peers()[:64]],
        }

    def _relay_addresses(self, relay: PeerID) -> list[Multiaddr]:
        return [m for m in self.address_book.get(relay, []) if m.relay is None and not m.is_unspecified]

    async def _accept(self, stream: ByteStream) -> None:
        await self._admit(stream, f"{stream.remote_host} (inbound)")

    async def _accept_relayed(self, rpc: Any, payload: Any, body: bytes) -> None:
        """`relay.incoming {source}` from a relay we hold a slot on: a peer wants a connection
        through it. Runs the handshake over the circuit and serves the connection until it ends."""
        relay = rpc.remote_peer
        if relay not in self.relay_client.relays:
            raise PeerUnreachableError("we hold no relay reservation with this peer")
        source = peer_field(payload, "source")
        await rpc.send(OK)
        circuit = RelayedStream(rpc, f"via relay {relay}")
        conn = await self._admit(circuit, f"peer {source} via relay {relay}", expected=source)
        if conn is None:
            return
        try:
            await conn.closed.wait()
        finally:
            conn.close("relay circuit closed")

    async def _admit(self, stream: ByteStream, where: str, expected: PeerID | None = None) -> Connection | None:
        """The accepting side of a new stream: limits, handshake, registration.

        Returns:
            The new connection, or None if the stream was refused or failed its handshake
            (closed, with one debug or rate-limited warning line).
        """
        limit = self.settings.max_pending_handshakes
        if self._pending_handshakes >= limit:  # strangers must not hold unbounded sockets and buffers
            self._limit_log.warning(
                "pending handshakes",
                "Refusing an inbound connection from %s: %d connections are already in the handshake "
                "(max_pending_handshakes=%d)",
                stream.remote_host,
                self._pending_handshakes,
                limit,
            )
            stream.close()
            return None
        offences = self._recent_offences(stream.remote_host)
        if self.settings.max_offences_per_host and offences >= self.settings.max_offences_per_host:
            self._limit_log.warning(
                "offending host",
                "Refusing an inbound connection from %s: %d of its connections broke limits in the last %g s",
                stream.remote_host,
                offences,
                OFFENCE_WINDOW,
            )
            stream.close()  # before the handshake: refusing costs no cryptography
            return None
        self._pending_handshakes += 1
        try:
            async with _timeout(self.settings.handshake_timeout):  # from here on, the handshake's (sealed) stream
                remote, maddrs, stream = await perform_handshake(
                    stream,
                    self.identity,
                    self.visible_maddrs(stream.remote_host),
                    None,
                    where,
                    self.settings.security,
                    self.bulk.divert(stream),  # a transfer we offered a peer, not a connection
                )
            if expected is not None and remote != expected:
                raise HandshakeError(f"the relay announced peer {expected} but peer {remote} answered")
        except Diverted:
            return None
        except Exception as e:  # whatever a stranger sends, drop the connection and keep serving
            logger.debug("Rejected inbound connection from %s: %s", where, e or type(e).__name__)
            stream.close()
            return None
        finally:
            self._pending_handshakes -= 1
        refusal = self._make_room(remote)
        if refusal is not None:
            with contextlib.suppress(Exception):  # best effort: it may be gone already
                for chunk in encode_frame([Kind.GOAWAY, 0, refusal]):
                    stream.write(chunk)
            stream.close()
            return None
        self.add_addrs(remote, _with_observed_host(maddrs, stream.remote_host))
        conn = self._connection(stream, remote, maddrs, outbound=False)
        self._register(conn)
        return conn

    def _recent_offences(self, remote_host: str) -> int:
        """How many connections from `remote_host` were dropped for breaking a limit within the
        last OFFENCE_WINDOW seconds (older ones, and hosts with none left, are forgotten)."""
        times = self._offences.get(remote_host)
        if not times:
            return 0
        recent = [t for t in times if time.monotonic() - t < OFFENCE_WINDOW]
        if recent:
            self._offences[remote_host] = recent[-64:]
        else:
            del self._offences[remote_host]
        if len(self._offences) > 4096:  # a bounded memory of offenders: the oldest go first
            for host in sorted(self._offences, key=lambda h: self._offences[h][-1])[:1024]:
                del self._offences[host]
        return len(recent)

    def _connection(self, stream: ByteStream, remote: PeerID, maddrs: list[Multiaddr], outbound: bool) -> Connection:
        return Connection(stream, remote, maddrs, self.handlers, self.settings, outbound, self._connection_log)

    def _make_room(self, peer_id: PeerID) -> str | None:
        """Make room for one more connection with `peer_id`: where a cap (per peer, then in
        all) is reached, close the least recently active connection that is idle.

        Returns:
            None if the new connection may be registered, else the reason it is refused
            (every connection under the cap is busy); both events are logged, rate-limited.
        """
        everyone = self.open_connections()
        same_peer = [c for c in everyone if c.remote_peer == peer_id]
        total_cap = self.settings.max_connections
        assert total_cap is not None  # __init__ filled in the default
        for pool, cap, name in (
            (same_peer, self.settings.max_connections_per_peer, "max_connections_per_peer"),
            (everyone, total_cap, "max_connections"),
        ):
            while len(pool) >= cap:
                idle = [c for c in pool if not c.busy]
                if not idle:
                    self._limit_log.warning(
                        f"{name} refused",
                        "Refusing a connection with peer %s: %d connections are open, all busy (%s=%d)",
                        peer_id,
                        len(pool),
                        name,
                        cap,
                    )
                    return f"this node is at its connection limit ({name}={cap}) and all of them are busy"
                victim = min(idle, key=lambda c: c.last_activity)
                self._limit_log.warning(
                    f"{name} evicted",
                    "%d connections are open (%s=%d): closing the least recently active one, with peer %s (%s), "
                    "to admit peer %s",
                    len(pool),
                    name,
                    cap,
                    victim.remote_peer,
                    victim.remote_host,
                    peer_id,
                )
                victim.goaway(f"closed to make room for another connection ({name}={cap})")
                for conns in (same_peer, everyone):
                    if victim in conns:
                        conns.remove(victim)
        return None

    # ---- dialing ---------------------------------------------------------------------------

    def add_addrs(self, peer_id: PeerID, maddrs: list[Multiaddr]) -> None:
        """Remember where `peer_id` listens (most recently learned first)."""
        if peer_id == self.peer_id:
            return
        known = self.address_book.setdefault(peer_id, [])
        if len(maddrs) <= len(known) and all(
            old.transport_address == new.transport_address for old, new in zip(known, maddrs, strict=False)
        ):
            return  # nothing new, and already in this order: the common case for DHT answers
        for maddr in reversed(maddrs):
            maddr = maddr.with_peer_id(peer_id)
            if maddr in known:
                known.remove(maddr)
            known.insert(0, maddr)
        del known[_MAX_ADDRS_PER_PEER:]

    def connection_to(self, peer_id: PeerID) -> Connection | None:
        """The open connection to `peer_id`, if any (no dialing)."""
        conn = self._connections.get(peer_id)
        return conn if conn is not None and not conn.is_closed else None

    async def connect(self, target: PeerID | Multiaddr) -> Connection:
        """Return an open connection to a peer, dialing it if needed.

        Args:
            target: a PeerID with known addresses, or a multiaddr with /p2p/<peer id>.

        Raises:
            PeerUnreachableError: no known address answered as that peer in time.
            ConfigError: the target is this node itself, or a multiaddr without /p2p.
            ConnectionClosedError: this host was closed while dialing.
            ResourceExhaustedError: this process is out of file descriptors, or this host is at
                `NetSettings.max_connections` with every connection busy.
        """
        if isinstance(target, Multiaddr):
            if target.peer_id is None:
                raise ConfigError(f"{target} has no /p2p/PEER_ID part; use the full address the peer printed")
            peer_id, candidates = target.peer_id, [target]
        else:
            peer_id, candidates = target, None
        if peer_id == self.peer_id:
            raise ConfigError(f"{target} is this node's own address")
        existing = self.connection_to(peer_id)
        if existing is not None:
            return existing
        loop = asyncio.get_running_loop()
        dial = self._dials.get(peer_id)
        if dial is not None and not dial.waiters and loop.time() - dial.began > STALE_DIAL_S:
            # Everyone who wanted it gave up a while ago. A dial whose SYNs were lost (an outage)
            # would keep a new caller waiting for the kernel's backed-off resend long after the
            # network is back, so the new caller gets a fresh dial. The old one runs on (a slow
            # handshake on a busy machine is still worth finishing) until aclose at the latest.
            del self._dials[peer_id]
            self._tasks.add(dial.task)
            dial.task.add_done_callback(self._tasks.discard)
            dial = None
        if dial is None:
            dial = _Dial(loop.create_task(self._dial(peer_id, candidates)), loop.time())
            self._dials[peer_id] = dial
            dial.task.add_done_callback(
                lambda _: self._dials.pop(peer_id, None) if self._dials.get(peer_id) is dial else None
            )
            # its callers may all have given up (timeouts) before it fails: its error is theirs to
            # see, and must not come back as "Task exception was never retrieved" with a traceback
            dial.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        dial.waiters += 1
        try:
            return await asyncio.shield(dial.task)  # several callers may share one dial
        except asyncio.CancelledError:
            if dial.task.cancelled():  # the host is closing, not our caller giving up
                raise ConnectionClosedError(f"this node closed while dialing peer {peer_id}") from None
            raise
        finally:
            dial.waiters -= 1

    async def _dial(self, peer_id: PeerID, candidates: list[Multiaddr] | None) -> Connection:
        """Dial every known address at once; the first to complete the handshake wins."""
        addrs = candidates if candidates is not None else self.address_book.get(peer_id, [])
        if not addrs:
            raise PeerUnreachableError(f"no known address for peer {peer_id}")
        attempts = [asyncio.ensure_future(self._dial_one(peer_id, addr)) for addr in addrs]
        for attempt in attempts:  # losers may still fail after we stop caring; retrieve that quietly
            attempt.add_done_callback(lambda t: t.cancelled() or t.exception())
        errors: list[str] = []
        winner: Connection | None = None
        try:
            for next_done in asyncio.as_completed(attempts):
                try:
                    winner = await next_done
                except (PeerUnreachableError, HandshakeError) as e:
                    errors.append(str(e))
                    continue
                refusal = self._make_room(peer_id)
                if refusal is not None:
                    winner.goaway(refusal)
                    raise ResourceExhaustedError(f"cannot connect to peer {peer_id}: {refusal}")
                if candidates is not None:
                    self.add_addrs(peer_id, candidates)
                self._register(winner)
                return self.connection_to(peer_id) or winner  # the pair's chosen one, if the peer dialed us too
        finally:
            for attempt in attempts:
                attempt.cancel()
                won = attempt.done() and not attempt.cancelled() and attempt.exception() is None
                if won and attempt.result() is not winner:  # a connection that lost the race
                    attempt.result().close("duplicate dial")
        raise PeerUnreachableError(f"cannot reach peer {peer_id}: " + "; ".join(errors))

    async def _dial_one(self, peer_id: PeerID, maddr: Multiaddr) -> Connection:
        if maddr.relay is not None:
            stream = await self._open_circuit(peer_id, maddr)
            remote_host = None  # whoever it is, it reaches us through a relay: tell it what anyone can use
        else:
            stream = await self.transport.dial(maddr.host, maddr.port, self.settings.connect_timeout)
            remote_host = maddr.host
        try:
            async with _timeout(self.settings.handshake_timeout):  # from here on, the handshake's (sealed) stream
                _, listen, stream = await perform_handshake(
                    stream,
                    self.identity,
                    self.visible_maddrs(remote_host),
                    peer_id,
                    maddr.transport_address,
                    self.settings.security,
                )
        except asyncio.TimeoutError:
            stream.close()
            raise PeerUnreachableError(
                f"{maddr.transport_address} accepted the connection but did not complete the handshake "
                f"within {self.settings.handshake_timeout:g} s"
            ) from None
        except (asyncio.IncompleteReadError, ConnectionError):
            stream.close()
            raise PeerUnreachableError(
                f"{maddr.transport_address} closed the connection during the handshake"
            ) from None
        except BaseException:
            stream.close()
            raise
        self.add_addrs(peer_id, listen)
        return self._connection(stream, peer_id, listen, outbound=True)

    async def _open_circuit(self, peer_id: PeerID, maddr: Multiaddr) -> ByteStream:
        """Ask the relay in a circuit address for a stream to `peer_id`.

        Raises:
            PeerUnreachableError: the relay cannot be reached, holds no slot for the peer, or the
                peer did not take the circuit in time.
        """
        relay = maddr.relay
        assert relay is not None
        if relay in (self.peer_id, peer_id):
            raise PeerUnreachableError(f"{maddr} names {'us' if relay == self.peer_id else 'the peer'} as its relay")
        timeout = self.settings.connect_timeout
        try:
            async with _timeout(timeout):
                relay_conn = await self.connect(maddr.relay_maddr)
            rpc = await relay_conn.open_stream("relay.connect", {"target": peer_id.to_bytes()})
        except asyncio.TimeoutError:
            raise PeerUnreachableError(f"relay {relay} did not answer within {timeout:g} s") from None
        except (HiveError, ConfigError) as e:
            raise PeerUnreachableError(f"cannot reach relay {relay}: {e}") from None
        try:
            answer = await rpc.recv(timeout=timeout + self.settings.handshake_timeout)
        except (HiveError, EndOfStream) as e:
            await rpc.cancel()
            reason = str(e) or "it ended the stream"
            raise PeerUnreachableError(f"relay {relay} could not connect us to peer {peer_id}: {reason}") from None
        if not accepted(answer):
            await rpc.cancel()
            raise PeerUnreachableError(f"relay {relay} sent an unexpected answer to relay.connect")
        return RelayedStream(rpc, f"via relay {relay}")

    def _choose(self, peer_id: PeerID) -> None:
        """Point `connection_to(peer_id)` at the best of our open connections to it.

        Two peers that dial each other at once end up with two connections, and each side would
        open its streams on the one it dialed: then both connections carry a round's data between
        them, and each is paced to one member's share of the uplink, so together they send twice
        that share into the other's downlink (measured: 4 peers on 100 Mbit/s links, the two
        downlinks of such a pair dropped 20-240 packets in every round, and the round's rate fell
        from 0.86-0.87 of the link to 0.78-0.81). So both sides rank them alike (`_rank`): a
        direct link before a relay's circuit, then the one dialed by the smaller peer ID. Where
        the same side dialed both (rare: a host shares one dial per peer), the one registered
        first (`min` keeps the first of equals, and the pool keeps its order), which the two
        sides may see in a different order."""
        candidates = [c for c in self._all_connections if c.remote_peer == peer_id and not c.is_closed]
        if candidates:
            self._connections[peer_id] = min(candidates, key=self._rank)
        else:
            self._connections.pop(peer_id, None)

    def _rank(self, conn: Connection) -> tuple[bool, bool]:
        """`_choose`'s order of a peer's connections, lowest first."""
        dialer = self.peer_id if conn.outbound else conn.remote_peer
        return conn.relayed, dialer != min(self.peer_id, conn.remote_peer)

    async def probe(self, maddr: Multiaddr) -> None:
        """Dial `maddr` on a fresh connection, complete the handshake with its /p2p peer, hang up
        (a dial-back check; the pool is not touched).

        Raises:
            PeerUnreachableError, HandshakeError: as a dial does.
        """
        assert maddr.peer_id is not None
        conn = await self._dial_one(maddr.peer_id, maddr)
        conn.close("dial-back check done")

    def _register(self, conn: Connection) -> None:
        """Add an authenticated connection to the pool; forget it once it closes."""
        self._all_connections[conn] = None
        self._choose(conn.remote_peer)

        def forget(_: Any) -> None:
            self._all_connections.pop(conn, None)
            self._choose(conn.remote_peer)  # a duplicate that lost the choice takes over
            if conn.broke_limit is not None:
                self._offences.setdefault(conn.remote_host, []).append(time.monotonic())

        task = asyncio.get_running_loop().create_task(conn.closed.wait())
        task.add_done_callback(forget)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- calling ---------------------------------------------------------------------------

    async def call(
        self,
        peer: PeerID | Multiaddr,
        method: str,
        payload: Any,
        body: bytes = b"",
        timeout: float | None = None,
    ) -> Message:
        """Connect if needed and call a unary method. Raises what `connect` and `Connection.call` raise."""
        conn = await self.connect(peer)
        return await conn.call(method, payload, body, timeout)

    def open_connections(self) -> list[Connection]:
        return [c for c in self._all_connections if not c.is_closed]

    async def _close_idle_connections(self) -> None:
        period = max(1.0, self.settings.idle_timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = asyncio.get_running_loop().time()
            for conn in list(self._all_connections):
                if not conn._streams and now - conn.last_activity > self.settings.idle_timeout:
                    conn.close("idle")

    async def aclose(self) -> None:
        """Stop listening, close every connection and wait for their tasks. Idempotent."""
        if self._janitor is not None:
            self._janitor.cancel()
        await self.relay_client.aclose()
        self.bulk.close()
        for listener in self._listeners:
            with contextlib.suppress(Exception):
                await listener.aclose()
        self._listeners.clear()
        conns = list(self._all_connections)
        await asyncio.gather(*(c.aclose() for c in conns), return_exceptions=True)
        pending = [
            *self._tasks,
            *(dial.task for dial in self._dials.values()),
            *([self._janitor] if self._janitor else []),
        ]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _with_observed_host(maddrs: list[Multiaddr], observed_host: str) -> list[Multiaddr]:
    """A peer that announces only loopback or unspecified hosts but reached us from a real
    address is probably misconfigured; also remember its port at the address we saw."""
    try:
        observed = ipaddress.ip_address(observed_host)
    except ValueError:
        return maddrs
    if observed.is_loopback or not maddrs or any(m.host == observed_host for m in maddrs):
        return maddrs
    if all(m.is_loopback or m.is_unspecified for m in maddrs):
        protocol = "ip4" if observed.version == 4 else "ip6"
        return [*maddrs, Multiaddr(protocol, str(observed), maddrs[0].port)]
    return maddrs
