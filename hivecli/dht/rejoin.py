"""Rejoiner: keeps a DHTNode connected to the DHT.

A node is cut off from the DHT when its routing table is empty, or when its requests all go
unanswered (its network is down or partitioned) even while the table still lists peers. While
cut off, it re-joins through every peer it has known (the routing table, peers dropped from it,
the initial peers, the address book), again every rejoin_period, until one answers; then it
looks up its own ID to refill the routing table, as bootstrap does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from hivecli._exceptions import HiveError
from hivecli.net.identity import PeerID
from hivecli.net.multiaddr import Multiaddr
from hivecli.utils.loops import wait_event

if TYPE_CHECKING:
    from hivecli.dht.node import DHTNode

logger = logging.getLogger(__name__)

# A node whose requests all go unanswered, this many in a row and none answered for wait_timeout,
# is cut off (its network is down or partitioned) even while its routing table still lists peers.
_CUT_OFF_AFTER_SILENCES = 4
_REJOIN_FANOUT = 64  # peers pinged at once by a re-join attempt; beyond, the less likely ones take turns
_CUT_OFF_WARNING_S = 30.0  # cut off this long is logged as a warning (first an info line), again at 2x, 4x...


class Rejoiner:
    """Watches whether `node` is cut off from the DHT and re-joins it. Created by the node, which
    starts it (`start`) once joined and stops it (`aclose`) on shutdown; each re-join adds one to
    `node.rejoins`."""

    def __init__(self, node: DHTNode):
        self.node = node
        self._wake = asyncio.Event()  # a request went unanswered or a node left the table
        self._answered = asyncio.Event()  # some peer answered a request of ours
        self._task: asyncio.Task[None] | None = None
        self._turn = 0  # where the next re-join attempt starts among the less likely peers
        node.protocol.on_silence = self._on_silence
        node.protocol.on_answer = self._on_answer

    def start(self) -> None:
        """Start watching, in a task of the running loop.

        Raises:
            RuntimeError: no event loop is running.
        """
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def aclose(self) -> None:
        """Stop watching, abandoning a re-join in progress. Idempotent."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        """Check again whether the node is cut off: say, a node left the table, which may be empty now."""
        self._wake.set()

    def _on_silence(self) -> None:
        self._wake.set()

    def _on_answer(self, peer: PeerID) -> None:
        self._answered.set()

    def _cut_off_reason(self) -> str | None:
        """Why the node seems cut off from the DHT, or None if it does not."""
        protocol = self.node.protocol
        if len(protocol.routing_table) == 0:
            return "its routing table is empty"
        silent_for = time.monotonic() - protocol.last_answer
        if protocol.silent_failures >= _CUT_OFF_AFTER_SILENCES and silent_for >= self.node.settings.wait_timeout:
            return f"its last {protocol.silent_failures} requests went unanswered"
        return None

    def _targets(self) -> list[tuple[PeerID, PeerID | Multiaddr]]:
        """Every peer the node has known, to re-join through, the likeliest first: those still in
        the routing table, those dropped from it (newest first), the initial peers, then the rest
        of the address book. Peers banned for wrong answers are left out."""
        node = self.node
        protocol, host = node.protocol, node.host
        targets: dict[PeerID, PeerID | Multiaddr] = {peer: peer for _, peer in protocol.routing_table}
        for peer, addrs in reversed(protocol.removed_peers.items()):
            if addrs and not host.address_book.get(peer):
                host.add_addrs(peer, addrs)
            targets.setdefault(peer, peer)
        for maddr in node.initial_peers:  # by address: we may never have reached them
            if maddr.peer_id is not None:
                targets.setdefault(maddr.peer_id, maddr)
        for peer in host.address_book:
            targets.setdefault(peer, peer)
        targets.pop(node.peer_id, None)
        return [(peer, target) for peer, target in targets.items() if not protocol.blacklist.misbehaved(peer)]

    async def _watch(self) -> None:
        """Background task: whenever the node seems cut off from the DHT, re-join it."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._cut_off_reason() is None or not self._targets():
                continue  # connected, or a lone node (the first of a swarm) with nobody to join
            try:
                await self._rejoin()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("Re-joining the DHT failed; will try again at the next failed request")

    async def _rejoin(self) -> None:
        """Ping known peers (see `_targets`) until one answers: all at once, again every
        rejoin_period, at most one ping per peer in flight. Then look up our own ID to refill the
        routing table, as `DHTNode.bootstrap` does.

        Bans for silence are lifted: they were probably our own outage. Peers that stayed
        connected took us out of their tables meanwhile; our pings put us back in."""
        node = self.node
        protocol, settings = node.protocol, node.settings
        began = time.monotonic()
        timeout = settings.effective_bootstrap_timeout
        pinging: dict[PeerID, asyncio.Future[None]] = {}
        errors: dict[PeerID, str] = {}
        reported_at = 0.0  # how long we had been cut off when we last said so (0: not yet)
        # a blip noticed only from a few unanswered requests, and over at once, is not worth a line
        worth_a_line = len(protocol.routing_table) == 0

        async def ping(peer: PeerID, target: PeerID | Multiaddr) -> None:
            try:
                if (await protocol.request(target, "dht.ping", {}, timeout)).get("node") is None:
                    errors[peer] = "it is a client-mode node, which cannot be joined through"
            except asyncio.TimeoutError:
                errors[peer] = f"no answer within {timeout:g} s"
                conn = node.host.connection_to(peer)
                if conn is not None and time.monotonic() - began >= 2 * timeout:
                    # Silent through a whole cut-off, even while busy (`request` closes idle links at
                    # once): a transfer stalled since the outage began, that TCP would resume only
                    # at its next backed-off resend, possibly long after the network is back. A new
                    # link connects at once. (A link just slow with a transfer may be cut here too,
                    # but a node that hears from nobody for this long has little to lose.)
                    conn.close(f"no answer to dht.ping within {timeout:g} s while cut off from the DHT")
            except (HiveError, ValueError) as e:
                errors[peer] = str(e) or type(e).__name__
            finally:
                pinging.pop(peer, None)

        try:
            while (reason := self._cut_off_reason()) is not None:
                targets = self._targets()
                if not targets:
                    return
                if len(targets) > _REJOIN_FANOUT:  # the likeliest every time, the others in turn
                    half, rest = _REJOIN_FANOUT // 2, targets[_REJOIN_FANOUT // 2 :]
                    start = self._turn % len(rest)
                    self._turn += half
                    targets = targets[:half] + (rest[start:] + rest[:start])[:half]
                for peer, target in targets:
                    if peer not in pinging:
                        pinging[peer] = asyncio.ensure_future(ping(peer, target))
                self._answered.clear()
                await wait_event(self._answered, settings.rejoin_period)
                cut_off_for = time.monotonic() - began
                # said once the first pings have timed out, then at 30 s, 60 s, 120 s...: one line each
                # time, so a peer that outlived its swarm (and keeps trying) logs little
                due = timeout + settings.rejoin_period if not reported_at else max(2 * reported_at, _CUT_OFF_WARNING_S)
                if cut_off_for >= due and self._cut_off_reason() is not None:
                    reported_at = cut_off_for
                    examples = "; ".join(f"{peer}: {why}" for peer, why in list(errors.items())[:3])
                    logger.log(
                        logging.WARNING if cut_off_for >= _CUT_OFF_WARNING_S else logging.INFO,
                        "Cut off from the DHT for %.0f s (%s): none of the %d known peers answered (%s); "
                        "trying again every %g s",
                        cut_off_for,
                        reason,
                        len(self._targets()),
                        examples or "no answer yet",
                        settings.rejoin_period,
                    )
        finally:
            for task in list(pinging.values()):  # the rest finish in the background; they only add to the table
                protocol.spawn(task)
        elapsed = time.monotonic() - began
        through = protocol.last_answer_peer if protocol.last_answer >= began else None
        how = f"through peer {through}" if through is not None else "after a peer reached it"
        level = logging.INFO if worth_a_line or reported_at else logging.DEBUG
        logger.log(level, "Re-joined the DHT %s after %.1f s", how, elapsed)
        protocol.blacklist.forgive_silent()
        node.rejoins += 1
        await node.refill_table()
