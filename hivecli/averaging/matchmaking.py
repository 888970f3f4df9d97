"""Matchmaking: peers that call `step()` at about the same time form groups through the DHT.

Each looking peer declares itself under the round's group key (`{prefix}.0b`, with the step's
scope, such as an epoch, so that only peers averaging the same thing meet; one owned subkey
per peer, which only that peer can write) with an expiration T, and polls that key. Peers are
ordered by (T, peer id), and a peer only asks peers *before* it to let it join; the first peer
accepts. Requests therefore never form a cycle and nobody deadlocks, whatever each peer's view
of the DHT is. A leader assembles its group the moment it is full, or at T with whoever joined (if at least
`min_group_size`). A peer accepted by a leader disbands its own followers and points them to
that leader.

Join requests are a stream: the requester sends its description; the leader answers
ACCEPTED with its expiration (then, later, BEGIN with the group, or DISBANDED) or one rejection
code.

Lockstep rounds: when our last group held every peer we saw looking (a swarm the size of a
group), the next round asks its leader at once, alongside the DHT lookup, which saves that
lookup's round trip, and declares itself only if that leader does not take it. That leader
declares a little earlier than the others (`HEAD_START`), so it stays first when everyone starts
at about the same time, and only if its followers have not filled the group within that head
start (a full group has no room for a newcomer who would find it). A follower that starts before
it says how long it will wait (`"hold"`, at most that margin), and the leader holds the request
of a member of the group it led last until its next search begins (then it asks again at once),
instead of refusing it: no polling. A lockstep peer still looks up the group key, at most once
per `LOOKOUT_SHARE` of min_matchmaking_time (a newcomer's declaration lives
min_matchmaking_time, so several lookups see it): a newcomer's declaration that it sees ends
lockstep for the next round. (A newcomer that meets a full lockstep group finds no declaration
of it, and is seen only by these lookups: lockstep may then last up to one interval longer.) In
a swarm larger than a group, nobody does any of this: joining the same leader every round would
keep apart groups that should mix.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hivecli._exceptions import HiveError, MatchmakingError
from hivecli.averaging.group import GroupInfo, Member, method_name
from hivecli.averaging.link import RoundPlan
from hivecli.averaging.settings import AveragingSettings
from hivecli.dht.node import DHTNode
from hivecli.dht.records import owned_entries, owned_subkey
from hivecli.net.connection import EndOfStream, Stream
from hivecli.net.identity import PeerID
from hivecli.utils.loops import timeout as _timeout
from hivecli.utils.loops import wait_event
from hivecli.utils.timing import get_dht_time

logger = logging.getLogger(__name__)

JOIN_METHOD = "avg.join"
ACCEPTED, BEGIN, DISBANDED = "accepted", "begin", "disbanded"
NOT_LOOKING, NOT_A_LEADER, GROUP_IS_FULL = "not_looking", "not_a_leader", "group_is_full"
ASK_AGAIN = "ask_again"  # a held request's answer once our search began (only to requests that say "hold")
BAD_GROUP_KEY, BAD_SCHEMA_HASH, BAD_REQUEST = "bad_group_key", "bad_schema_hash", "bad_request"

_FIRST_POLL_DELAY, _MAX_POLL_DELAY = 0.002, 0.25
_MAX_GUESS_DELAY = 0.02  # between requests to a likely leader that is not looking yet

# The leader of a lockstep round declares this share of min_matchmaking_time earlier than the
# others (it waits that much less for an incomplete group), so that it leads the next round too
# when the peers start within that margin of each other, and its followers' direct requests land.
HEAD_START = 0.1

# A lockstep peer looks up the group key at most once per this share of min_matchmaking_time, not
# every round: a newcomer's declaration lives min_matchmaking_time, so several lookouts see it
# while it lasts. Four lookups per 4-peer round were a tenth of a 4 x 1M round's CPU on 2 cores.
# What a lookout found counts for two of its intervals (a lookup cut short by a full group
# leaves no newer one, and a peer it found may have left since).
LOOKOUT_SHARE = 0.2


@dataclass(order=True, frozen=True)
class Candidate:
    """A declared peer, in the order that decides who may ask whom."""

    expiration: float
    peer_id: PeerID = field(compare=True)
    addrs: tuple[str, ...] = field(default=(), compare=False)


@dataclass
class _Follower:
    member: Member
    outcome: asyncio.Future[list[Any]]  # the message its join stream ends with


class Matchmaker:
    """Serves join requests for one averager and runs its group searches, one at a time."""

    def __init__(
        self,
        node: DHTNode,
        prefix: str,
        schema_hash: bytes,
        settings: AveragingSettings,
        client_mode: bool,
        is_banned: Callable[[PeerID], bool] = lambda peer: False,
        plan_round: Callable[[int], RoundPlan] = lambda size: RoundPlan(),
    ):
        self.node, self.prefix, self.schema_hash = node, prefix, schema_hash
        self.settings, self.client_mode = settings, client_mode
        self.is_banned = is_banned  # peers caught hostile: never in our groups, never our leaders
        self.plan_round = plan_round  # how a round we lead travels, by group size (link.py)
        self.group_key = f"{prefix}.0b"
        self._search: _Search | None = None
        self._last: _Search | None = None  # the previous search, which the next one learns from
        self._background: set[asyncio.Future[Any]] = set()
        self._began = asyncio.Event()  # set (and at once cleared) as each search begins: held requests go on
        self._held: set[PeerID] = set()  # members of our last group whose requests wait for our next search
        self._looked_up = -math.inf  # time.monotonic() when our last lookup of declared peers began
        self._declared: frozenset[PeerID] = frozenset()  # the others the last finished one found declared
        self._declared_at = -math.inf  # when it finished (it may finish after its search)
        self._hold_ran_out = False  # a held request ran out before our search began
        node.host.add_stream_handler(method_name(JOIN_METHOD, prefix), self._handle_join)

    @property
    def peer_id(self) -> PeerID:
        return self.node.peer_id

    def my_addrs(self) -> tuple[str, ...]:
        return () if self.client_mode else tuple(str(m) for m in self.node.host.visible_maddrs())

    async def look_for_group(
        self, gathered: Any, bandwidth: float | None, deadline: float, scope: str = ""
    ) -> GroupInfo:
        """Find a group of peers looking under the same `scope` before `deadline` (loop time).

        Raises:
            MatchmakingError: no group of at least min_group_size peers formed in time.
        """
        if self._search is not None:
            raise RuntimeError("this averager is already looking for a group")
        me = Member(self.peer_id, self.my_addrs(), self.client_mode, 0.0 if self.client_mode else bandwidth, gathered)
        search = _Search(self, me, deadline, f"{self.group_key}.{scope}" if scope else self.group_key)
        self._search = search
        hold_ran_out, self._hold_ran_out = self._hold_ran_out, False
        self._began.set()  # wakes the held requests (their waits ended: clearing does not stop them)
        self._began.clear()
        group = None
        try:
            group = await search.run(wait_for_followers=not hold_ran_out)
            search.group_ids = frozenset(group.peer_ids)
            return group
        finally:
            search.finished = True
            self._search, self._last = None, search
            search.disband_followers(None)
            # Withdrawn in the background (the round runs meanwhile), also after a group formed:
            # otherwise the next round's first lookup, which runs while the new declarations are
            # being stored, finds this one, still live, and asks us first, as it sorts before
            # every new one: a round trip lost per stale declaration (at 50 ms RTT, up to 150 ms
            # of a 4-peer round's matchmaking). Our next declaration replaces the withdrawal, as
            # it expires later.
            if search.declared_expiration is not None:
                self._spawn(self._withdraw(search.group_key, search.declared_expiration))

    async def _withdraw(self, group_key: str, expiration: float) -> None:
        # a value just after our declaration replaces it (the DHT keeps the newest per subkey)
        with contextlib.suppress(HiveError, OSError):
            withdrawn = math.nextafter(expiration, math.inf)
            await self.node.store(group_key, None, withdrawn, owned_subkey(self.peer_id))

    def lockstep(self) -> bool:
        """Whether our last group held every peer we saw looking in that search, and every other
        peer our last lookup found declared (a lookup that ends after its search still counts)."""
        last = self._last
        if last is None or not last.group_ids:
            return False
        fresh = time.monotonic() - self._declared_at <= 2 * self.lookout_interval()
        return last.seen | (self._declared if fresh else frozenset()) <= last.group_ids

    def likely_leader(self) -> Candidate | None:
        """Who to ask at once in the next search: the leader of our last group, in lockstep, while
        we still have a connection to it (one that left costs nothing, not a dial's timeout)."""
        leader = self._last.joined if self._last is not None and self.lockstep() else None
        if leader is None or self.is_banned(leader.peer_id) or self.node.host.connection_to(leader.peer_id) is None:
            return None
        return Candidate(-math.inf, leader.peer_id, leader.addrs)  # its new expiration comes with ACCEPTED

    def head_start(self) -> float:
        """Seconds to declare early: the leader of the last lockstep round keeps its lead."""
        led = self._last is not None and self._last.joined is None and self.lockstep()
        return self.head_start_margin() if led else 0.0

    def head_start_margin(self) -> float:
        return HEAD_START * self.settings.min_matchmaking_time

    def lookout_interval(self) -> float:
        return LOOKOUT_SHARE * self.settings.min_matchmaking_time

    def lookout_due(self) -> bool:
        """Whether a lockstep peer looks up the declared peers this round (LOOKOUT_SHARE)."""
        return time.monotonic() - self._looked_up >= self.lookout_interval()

    async def _hold(self, member: Member, payload: dict[str, Any]) -> bool:
        """Between our searches: keep a request from a member of the group we led last until
        our next search begins, for as long as it says it waits (`hold`), at most our head start
        margin (what it would otherwise spend asking again); one request per member. False if
        we do not hold it.

        A held request itself is never served, only answered: ASK_AGAIN once our search has
        begun, NOT_LOOKING if it ran out first. Its sender may have given up on it meanwhile (a
        cancelled step), with its CANCEL still on the way, and a group assembled with it would
        wait for a member that is not coming."""
        last, peer = self._last, member.peer_id
        hold = payload.get("hold")
        if not (isinstance(hold, (int, float)) and not isinstance(hold, bool) and hold > 0):
            return False  # older peers, and requests that are not to a likely leader
        if last is None or last.joined is not None or peer not in last.group_ids or peer in self._held:
            return False
        self._held.add(peer)
        try:
            if not await wait_event(self._began, min(float(hold), self.head_start_margin())):
                self._hold_ran_out = self._search is None  # it goes on without us: look, do not wait
        finally:
            self._held.discard(peer)
        return True

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # ---- the leader's side of a join request --------------------------------------------------

    async def _handle_join(self, stream: Stream, payload: Any, body: bytes) -> None:
        try:
            member = Member.from_wire(payload.get("member")) if isinstance(payload, dict) else None
            expiration = float(payload["expiration"]) if member is not None else 0.0
        except (ValueError, KeyError, TypeError):
            member = None
        if member is None or member.peer_id != stream.remote_peer or self.is_banned(member.peer_id):
            await stream.send({"code": BAD_REQUEST})
            return
        if self._search is None and await self._hold(member, payload):
            await stream.send({"code": ASK_AGAIN if self._search is not None else NOT_LOOKING})
            return
        search = self._search
        if search is None or search.finished:
            await stream.send({"code": NOT_LOOKING})
        elif payload.get("group_key") != search.group_key:
            await stream.send({"code": BAD_GROUP_KEY})
        elif payload.get("schema_hash") != self.schema_hash:
            await stream.send({"code": BAD_SCHEMA_HASH})
        else:
            await search.serve_join(stream, member, expiration)


class _Search:
    """One `look_for_group` call: declare, ask the peers before us, lead if nobody takes us."""

    def __init__(self, matchmaker: Matchmaker, me: Member, deadline: float, group_key: str):
        self.mm, self.me, self.deadline, self.group_key = matchmaker, me, deadline, group_key
        self.settings = matchmaker.settings
        self.loop = asyncio.get_running_loop()
        self.finished = False
        self.expiration = math.inf  # clients never declare and may ask anyone
        self.declared_expiration: float | None = None
        self.leader: Candidate | None = None  # set while we follow someone
        self.followers: dict[PeerID, _Follower] = {}
        self.changed = asyncio.Event()  # a follower came or went
        self.tried: dict[PeerID, float] = {}  # candidate -> the expiration we already asked at
        self.rejoins = matchmaker.node.rejoins  # the DHT node's re-joins we have caught up with
        self.seen: set[PeerID] = set()  # every other peer we saw looking: declared, or asking us
        self.joined: Candidate | None = None  # the leader whose group we averaged in
        self.group_ids: frozenset[PeerID] = frozenset()  # the group's members, once it formed
        self.refusal: str | None = None  # why the last peer we asked did not take us

    @property
    def order(self) -> tuple[float, PeerID]:
        return (self.expiration, self.me.peer_id)

    def group_size(self) -> int:
        return 1 + len(self.followers)

    async def run(self, wait_for_followers: bool = True) -> GroupInfo:
        poll_delay = _FIRST_POLL_DELAY
        declaring = None
        lookup: asyncio.Future[list[Candidate] | None] | None = None
        if not self.me.client_mode:
            self.new_expiration()
        try:
            guess = self.mm.likely_leader()
            if guess is not None:
                # Lockstep: ask the last round's leader while the lookup runs, not after it. We
                # declare only if it does not take us: a newcomer finds a group that is not full
                # through the leader's declaration, and our lookup still sees the newcomer's (which
                # ends lockstep for the next round). Two DHT stores per follower and round saved, and
                # the verification of each at every node that holds the key: 4 x 1M rounds on
                # 2 cores spent a third of their matchmaking CPU on them.
                if self.mm.lookout_due():
                    lookup = asyncio.ensure_future(self.fetch_unless_full())
                group = await self.join_likely_leader(guess)
                if group is not None:
                    # The lookup still tells the next round whether others are looking (`seen`).
                    if lookup is not None:
                        lookup.add_done_callback(lambda done: done.cancelled() or done.exception())
                        self.mm._spawn(lookup)
                        lookup = None
                    return group
            if self.mm.head_start() > 0 and wait_for_followers:  # (a peer that led asked no likely leader)
                # We led the last lockstep round: its members ask us at once, and we are the first
                # of them to declare, so a lookup would only find newcomers: a lookout, at most once
                # per interval, to its end in the background, as our followers' (unless a held
                # request ran out before we began: its sender declared, earlier than us, so look).
                if self.mm.lookout_due():
                    self.mm._spawn(self.lookout())
                # We declare only if they do not fill the group within our head start: a full group
                # has no room for a newcomer who finds our declaration, and the lookouts see
                # newcomers all the same. Two DHT stores per round saved (the declaration and its
                # withdrawal), and their verification at every node that holds the key.
                wait = min(self.mm.head_start_margin(), max(0.0, self.deadline - self.loop.time()))
                await self.wait_until_full(wait)
                if self.group_size() >= self.settings.target_group_size:
                    return self.assemble()
            if not self.me.client_mode:
                # Our declaration is stored while we look for candidates, not before: one round trip
                # less per round (50 ms of a 3.8 s round on a 100 Mbit/s link with 50 ms RTT).
                declaring = asyncio.ensure_future(self.store_declaration())
            return await self._look(poll_delay, declaring, lookup)
        finally:
            for pending in (declaring, lookup):
                if pending is not None and not pending.done():
                    pending.cancel()
                    await asyncio.gather(pending, return_exceptions=True)

    async def join_likely_leader(self, guess: Candidate) -> GroupInfo | None:
        """Ask the last round's leader to take us. It may start up to its head start after us:
        it holds our request until then (`hold`). An older leader refuses while it is not
        looking yet; ask it again for as long, and stop once a peer asked to join us instead
        (so we lead, or it points us on)."""
        until = self.loop.time() + self.mm.head_start_margin()
        delay = _FIRST_POLL_DELAY
        asked_again = False
        while True:
            group = await self.try_join(guess, hold=until - self.loop.time())
            if self.refusal == ASK_AGAIN and not asked_again and self.loop.time() < until:
                asked_again = True  # once: a leader that keeps saying so is polled like one not looking
                continue  # it looks now
            if group is not None or self.refusal not in (NOT_LOOKING, ASK_AGAIN) or self.loop.time() + delay > until:
                return group
            self.changed.clear()
            await wait_event(self.changed, delay)
            if self.followers:
                return None
            delay = min(2 * delay, _MAX_GUESS_DELAY)

    async def _look(
        self,
        poll_delay: float,
        declaring: asyncio.Future[None] | None,
        lookup: asyncio.Future[list[Candidate] | None] | None,
    ) -> GroupInfo:
        while True:
            if self.group_size() >= self.settings.target_group_size:
                return self.assemble()
            if self.rejoins != self.mm.node.rejoins:
                await self.after_rejoin()
            candidates = await (lookup if lookup is not None else self.fetch_unless_full())
            lookup = None
            if candidates is None:
                return self.assemble()
            for candidate in candidates:
                if self.group_size() >= self.settings.target_group_size:
                    break
                group = await self.try_join(candidate)
                if group is not None:
                    return group
            if declaring is not None:  # stored by now (or raising why not), before we wait for others
                await declaring
                declaring = None
            if self.group_size() >= self.settings.target_group_size:
                return self.assemble()
            now = get_dht_time()
            if now >= self.expiration and not self.me.client_mode:
                if self.group_size() >= self.settings.min_group_size:
                    return self.assemble()
                self.disband_followers(None)
                if self.loop.time() + self.settings.min_matchmaking_time / 4 < self.deadline:
                    await self.declare()  # nobody came in time: try again with a new expiration
                    poll_delay = _FIRST_POLL_DELAY
                    continue
            if self.loop.time() >= self.deadline:
                raise MatchmakingError(
                    f"found {self.group_size()} of the needed {self.settings.min_group_size} peers under "
                    f"prefix {self.mm.prefix!r} before the timeout; start more peers with the same prefix "
                    f"and tensor shapes" + (", or lower min_group_size" if self.settings.min_group_size > 2 else "")
                )
            wait = min(poll_delay, max(0.0, self.deadline - self.loop.time()))
            if not self.me.client_mode:
                wait = min(wait, max(0.0, self.expiration - get_dht_time()))
            self.changed.clear()
            await wait_event(self.changed, wait)
            poll_delay = min(2 * poll_delay, _MAX_POLL_DELAY)

    async def lookout(self) -> None:
        """`fetch_candidates` for what it tells the next round (`seen`, Matchmaker._declared)."""
        with contextlib.suppress(HiveError, OSError, asyncio.TimeoutError):
            await self.fetch_candidates()

    async def wait_until_full(self, seconds: float) -> None:
        """Wait until our group is full, or `seconds` pass."""
        until = self.loop.time() + seconds
        while self.group_size() < self.settings.target_group_size and self.loop.time() < until:
            self.changed.clear()
            await wait_event(self.changed, until - self.loop.time())

    async def fetch_unless_full(self) -> list[Candidate] | None:
        """`fetch_candidates`, or None as soon as our group is full: a leader whose last follower
        joins while it looks up the candidates assembles at once, not a round trip later.

        Raises:
            what `fetch_candidates` raises.
        """
        fetch = asyncio.ensure_future(self.fetch_candidates())
        changed: asyncio.Future[Any] | None = None
        try:
            while True:
                self.changed.clear()
                if self.group_size() >= self.settings.target_group_size:
                    return None
                changed = asyncio.ensure_future(self.changed.wait())
                await asyncio.wait({fetch, changed}, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
                if fetch.done():
                    return fetch.result()
        finally:
            for waiter in (fetch, changed):
                if waiter is not None and not waiter.done():
                    waiter.cancel()
            await asyncio.gather(*(w for w in (fetch, changed) if w is not None), return_exceptions=True)

    async def declare(self) -> None:
        self.new_expiration()
        await self.store_declaration()

    def new_expiration(self) -> None:
        """A new declaration's expiration, which orders us against the other candidates."""
        deadline_dht = get_dht_time() + max(0.0, self.deadline - self.loop.time())
        wait = self.settings.min_matchmaking_time - self.mm.head_start()
        self.expiration = min(get_dht_time() + wait, deadline_dht)
        self.tried.clear()

    async def store_declaration(self) -> None:
        self.declared_expiration = self.expiration  # withdrawn when the search ends, even if this fails midway
        await self.mm.node.store(self.group_key, list(self.me.addrs), self.expiration, owned_subkey(self.me.peer_id))

    async def after_rejoin(self) -> None:
        """Our DHT node was cut off and is back: what we declared meanwhile reached only our own
        storage, so others could not find us, and peers we failed to reach may be back too."""
        self.rejoins = self.mm.node.rejoins
        self.tried.clear()
        if self.declared_expiration is not None and self.declared_expiration > get_dht_time():
            subkey = owned_subkey(self.me.peer_id)
            await self.mm.node.store(self.group_key, list(self.me.addrs), self.declared_expiration, subkey)

    async def fetch_candidates(self) -> list[Candidate]:
        """Declared peers before us that we have not yet asked at their current declaration."""
        self.mm._looked_up = time.monotonic()
        found = await self.mm.node.get(self.group_key, latest=True)
        candidates, declared = [], set()
        for peer, value, expiration in owned_entries(found):  # only a peer itself writes its declaration
            if not isinstance(value, list) or not value or self.mm.is_banned(peer):
                continue  # withdrawn (None), malformed, or a peer caught hostile
            if peer != self.me.peer_id and expiration > get_dht_time():
                declared.add(peer)
            candidate = Candidate(expiration, peer, tuple(a for a in value if isinstance(a, str)))
            if peer == self.me.peer_id or (candidate.expiration, peer) >= self.order:
                continue
            if self.tried.get(peer) == candidate.expiration or candidate.expiration <= get_dht_time():
                continue
            candidates.append(candidate)
        self.seen |= declared
        self.mm._declared, self.mm._declared_at = frozenset(declared), time.monotonic()
        return sorted(candidates)

    async def try_join(self, candidate: Candidate, hold: float = 0.0) -> GroupInfo | None:
        """Ask `candidate` to take us. Returns the group if we end up averaging in one. With
        `hold` > 0, a leader not looking yet may keep the request up to that many seconds, until
        it is (Matchmaker._hold)."""
        self.tried[candidate.peer_id] = candidate.expiration
        host = self.mm.node.host
        request = {
            "member": self.me.to_wire(),
            "expiration": self.expiration,
            "group_key": self.group_key,
            "schema_hash": self.mm.schema_hash,
        }
        hold = max(0.0, hold)
        if hold:
            request["hold"] = hold  # older leaders ignore it, and refuse at once
        stream: Stream | None = None
        self.refusal = None
        unanswered = False  # the request went out, and no reply came in time
        asked = asyncio.get_running_loop().time()
        try:
            host.add_addrs(candidate.peer_id, Member(candidate.peer_id, candidate.addrs, False, None).multiaddrs())
            async with _timeout(self.settings.request_timeout + hold):
                conn = await host.connect(candidate.peer_id)
                stream = await conn.open_stream(method_name(JOIN_METHOD, self.mm.prefix), request)
                reply = (await stream.recv()).payload
            code = reply.get("code") if isinstance(reply, dict) else None
            self.refusal = None if code == ACCEPTED else code
            if code == NOT_A_LEADER and reply.get("leader"):
                await stream.cancel()
                return await self.follow_suggestion(reply["leader"])
            if code != ACCEPTED:
                logger.debug("Peer %s did not take us: %s", candidate.peer_id, code)
                return None
            if not math.isfinite(candidate.expiration):  # a likely leader, asked before any lookup
                candidate = dataclasses.replace(candidate, expiration=self.accepted_expiration(reply))
            return await self.follow(candidate, stream)
        except (HiveError, OSError, EndOfStream, asyncio.TimeoutError) as e:
            logger.debug("Join request to %s failed: %s", candidate.peer_id, e or type(e).__name__)
            unanswered = isinstance(e, asyncio.TimeoutError) and stream is not None
            return None
        finally:
            if stream is not None and stream.ended_by_peer:
                stream.forget()  # the leader ended with its last word (BEGIN): nothing to cancel there
            elif stream is not None:
                await stream.cancel()
                # A leader answers at once, so silence means a dead link, such as a TCP connection from
                # before a network outage that retransmits on a long backed-off timer: close it (unless
                # it carries more) so that the next request connects afresh.
                if unanswered and not stream.connection.busy and stream.connection.silent_since(asked):
                    stream.connection.close(f"no reply to a join request within {self.settings.request_timeout:g} s")

    def accepted_expiration(self, reply: dict[str, Any]) -> float:
        """The expiration a leader that took us declared, as its ACCEPTED says, at most ours (only
        a peer before us may take us); ours without it (peers of step 9 and earlier). A client,
        which declares nothing, bounds it by its deadline."""
        bound = self.expiration
        if not math.isfinite(bound):
            bound = get_dht_time() + max(0.0, self.deadline - self.loop.time())
        declared = reply.get("expiration")
        if isinstance(declared, (int, float)) and not isinstance(declared, bool) and math.isfinite(declared):
            return min(float(declared), bound)
        return bound

    async def follow_suggestion(self, suggestion: Any) -> GroupInfo | None:
        try:
            leader = Member.from_wire(suggestion[0])
            expiration = float(suggestion[1])
        except (ValueError, TypeError, IndexError):
            return None
        candidate = Candidate(expiration, leader.peer_id, leader.addrs)
        if (expiration, leader.peer_id) >= self.order or leader.peer_id == self.me.peer_id:
            return None
        if self.mm.is_banned(leader.peer_id):
            return None
        return await self.try_join(candidate)

    async def follow(self, leader: Candidate, stream: Stream) -> GroupInfo | None:
        """We were accepted: hand our own followers over to the leader and wait for BEGIN."""
        self.leader = leader
        self.disband_followers(leader)
        try:
            wait = max(0.0, leader.expiration - get_dht_time()) + self.settings.request_timeout
            wait = min(wait, max(0.0, self.deadline - self.loop.time()) + self.settings.request_timeout)
            reply = (await stream.recv(timeout=wait)).payload
            if isinstance(reply, dict) and reply.get("code") == BEGIN:
                group = GroupInfo.from_wire(reply.get("group"))
                if self.me.peer_id in group.peer_ids:
                    self.joined = leader
                    return group
            return None
        except (HiveError, EndOfStream, ValueError) as e:
            logger.debug("Leader %s dropped us: %s", leader.peer_id, e or type(e).__name__)
            return None
        finally:
            self.leader = None

    def assemble(self) -> GroupInfo:
        members = [self.me, *(f.member for f in self.followers.values())]
        random.shuffle(members)  # the order decides who reduces which part
        group = GroupInfo(os.urandom(20), tuple(members), self.mm.plan_round(len(members)))
        message = [BEGIN, group.to_wire()]
        for follower in self.followers.values():
            if not follower.outcome.done():
                follower.outcome.set_result(message)
        self.followers.clear()
        self.finished = True
        return group

    def disband_followers(self, new_leader: Candidate | None) -> None:
        suggestion = None
        if new_leader is not None:
            leader_member = Member(new_leader.peer_id, new_leader.addrs, False, None)
            suggestion = [leader_member.to_wire(), new_leader.expiration]
        for follower in self.followers.values():
            if not follower.outcome.done():
                follower.outcome.set_result([DISBANDED, suggestion])
        self.followers.clear()

    # ---- serving join requests ------------------------------------------------------------------

    async def serve_join(self, stream: Stream, member: Member, expiration: float) -> None:
        self.seen.add(member.peer_id)  # looking, whether we take it or not
        if self.leader is not None:
            leader_member = Member(self.leader.peer_id, self.leader.addrs, False, None)
            await stream.send({"code": NOT_A_LEADER, "leader": [leader_member.to_wire(), self.leader.expiration]})
            return
        if self.me.client_mode or (not member.client_mode and (expiration, member.peer_id) <= self.order):
            await stream.send({"code": NOT_A_LEADER})  # it must ask peers before it, never after
            return
        if self.group_size() >= self.settings.target_group_size or member.peer_id in self.followers:
            await stream.send({"code": GROUP_IS_FULL})
            return
        follower = _Follower(member, self.loop.create_future())
        self.followers[member.peer_id] = follower
        self.changed.set()
        try:
            await stream.send({"code": ACCEPTED, "expiration": self.expiration})
            code, data = await follower.outcome
            # our last word, and our end, in one frame: the follower then forgets the stream, no CANCEL
            await stream.send_last({"code": code, "group": data} if code == BEGIN else {"code": code, "leader": data})
        finally:
            if self.followers.get(member.peer_id) is follower:  # it left before the group formed
                del self.followers[member.peer_id]
                self.changed.set()
