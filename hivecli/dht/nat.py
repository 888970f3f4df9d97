"""What a DHT peer does about NAT: check whether others can dial it, and act on the answer.

After joining, the peer asks one or two peers it knows to dial it back
(`hivecli.net.reachability`). Then:

* reachable: nothing changes; it may relay for others (RelaySettings.serve=None turns that on);
* unreachable: it stops serving the DHT (client mode: others would only waste dials on it) and
  reserves a slot on a reachable peer, a relay, so that others can still reach it for averaging
  through a circuit address; with no relay to be had, it averages as a client;
* nobody could check (a peer alone in its swarm): it asks again when it knows someone.

It checks again every `RECHECK_S` (addresses and routers change) and finds another relay when one
leaves. Each verdict that differs from the last is logged once, with the advice the user needs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from hivecli.net.reachability import PUBLIC, UNKNOWN, UNREACHABLE, ReachabilityReport, advice, check_reachability
from hivecli.utils.loops import wait_event

if TYPE_CHECKING:
    from hivecli.dht.node import DHTNode
    from hivecli.net.identity import PeerID

logger = logging.getLogger(__name__)

RECHECK_S = 300.0  # seconds between checks once there is a verdict
UNKNOWN_RETRY_S = 3.0  # seconds between tries while nobody could check (cheap: no request without peers)
RETRY_S = 10.0  # seconds between relay searches while unreachable without a relay
RELAYS_WANTED = 2


class NatTraversal:
    """Keeps a DHT node's reachability verdict current and its relay slots held."""

    def __init__(self, node: DHTNode):
        self.node = node
        self.host = node.host
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stranded_logged = False
        self.host.relay_client.on_change = self._wake.set

    @property
    def report(self) -> ReachabilityReport:
        return self.host.reachability

    @property
    def relayed(self) -> bool:
        """Whether others can reach us only through a relay we hold a slot on."""
        return self.report.status == UNREACHABLE and bool(self.host.relay_client.relays)

    @property
    def reachable(self) -> bool:
        """Whether others can open connections to us, directly or through a relay (unknown counts
        as reachable: a peer alone in its swarm has not been told otherwise)."""
        return self.report.status != UNREACHABLE or self.relayed

    async def check(self) -> ReachabilityReport:
        """Run one dial-back check and act on it (client mode, relays). Logs a changed verdict."""
        before = self.report
        report = await check_reachability(self.host, self._candidates(), timeout=self.host.settings.connect_timeout)
        if report.status == UNKNOWN and before.status != UNKNOWN:
            return before  # nobody could check this time: keep what we knew
        self.host.set_reachability(report)
        if report.status == UNREACHABLE:
            self.node.set_client_mode(True)
            if self.host.settings.relay.use and len(self.host.relay_client.relays) < RELAYS_WANTED:
                await self.host.relay_client.reserve(self._candidates(report.checked_by), RELAYS_WANTED)
        elif report.status == PUBLIC and before.status == UNREACHABLE and not self.node.requested_client_mode:
            self.node.set_client_mode(False)
        if report.status != before.status or report.reachable != before.reachable:
            # the verdict at start-up is for whoever starts the peer to print (see DHT.reachability);
            # a later change is news that only the log can carry
            self._log(report, loud=self._task is not None)
        return report

    def _log(self, report: ReachabilityReport, loud: bool) -> None:
        port = next((m.port for m in self.host.listen_maddrs if m.port), None)
        text = advice(report, port, relayed=self.relayed)
        if not loud:  # at start-up: whoever started the peer prints DHT.reachability itself
            logger.debug("%s", text)
        elif report.status == UNREACHABLE:
            logger.warning("%s", text)
        else:
            logger.info("%s", text)
        for failure in report.failures[:4]:
            logger.debug("Dial-back failed: %s", failure)

    def _candidates(self, first: tuple[PeerID, ...] = ()) -> list[PeerID]:
        """Peers to ask for a dial-back or a relay slot: `first`, then those we are connected to,
        then the rest of the routing table; only peers we reach directly."""
        found: list[PeerID] = list(first)
        connected = [c.remote_peer for c in self.host.open_connections() if c.outbound]
        initial = [m.peer_id for m in self.node.initial_peers if m.peer_id is not None]
        table = [peer for _, peer in self.node.protocol.routing_table]
        for peer in [*initial, *connected, *table]:
            direct = any(m.relay is None for m in self.host.address_book.get(peer, []))
            if peer not in found and peer != self.host.peer_id and direct:
                found.append(peer)
        return found

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            stranded = self.report.status == UNREACHABLE and not self.relayed
            pause = UNKNOWN_RETRY_S if self.report.status == UNKNOWN else RETRY_S if stranded else RECHECK_S
            woken = await wait_event(self._wake, pause)  # True: a relay came or went
            self._wake.clear()
            try:
                if self.report.status == UNREACHABLE and not self.relayed and self.host.settings.relay.use:
                    await self.host.relay_client.reserve(self._candidates(), RELAYS_WANTED)
                    if self.relayed:
                        logger.info("Reachable again through relay %s", self.host.relay_client.relays[0])
                        self._stranded_logged = False
                    elif not self._stranded_logged:
                        logger.warning("No known peer relays for this peer now; others cannot reach it until one does")
                        self._stranded_logged = True
                elif not woken:
                    await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a failed check is retried; it must not end the loop
                logger.info("Reachability check failed: %s", e or type(e).__name__)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


__all__ = ["NatTraversal"]
