"""Can others dial us? Ask peers we know to try (dial-back), as Petals and libp2p's AutoNAT do.

A peer sends `net.dialback {addrs}` to one or two peers it is connected to. Each dials back, on
a fresh connection, and completes the handshake only with the asking peer's key:

* only at the IP address it sees the request come from (the asker's public address, when it
  is behind NAT), so that nobody can use it to probe or flood a third party;
* at the ports of the asker's announced addresses, and at each announced address whose host is
  that IP (at most `MAX_DIALBACK_ADDRS`).

The answer lists, per address, whether the handshake completed and why not. The asker then
knows which of its addresses others can use (`ReachabilityReport`), prints advice when none
works (`advice`), and the DHT layer switches to client mode or reserves a relay.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hivecli._exceptions import ConfigError, HiveError, PeerUnreachableError
from hivecli.net.identity import PeerID
from hivecli.net.multiaddr import Multiaddr
from hivecli.utils.loops import timeout as _timeout

if TYPE_CHECKING:
    from hivecli.net.connection import Connection
    from hivecli.net.host import Host

logger = logging.getLogger(__name__)

MAX_DIALBACK_ADDRS = 8
DIALBACK_TIMEOUT = 3.0  # seconds per dial-back attempt (connect + handshake)
_MIN_INTERVAL = 5.0  # seconds between dial-backs for one peer (they go only to its own IP, at most 8 ports)
_MAX_CONCURRENT = 4

PUBLIC, UNREACHABLE, UNKNOWN = "public", "unreachable", "unknown"


@dataclass(frozen=True)
class ReachabilityReport:
    """What the dial-back found.

    Attributes:
        status: "public" (some address answered), "unreachable" (every checked address failed)
            or "unknown" (nobody could check: no peer answered the request).
        reachable: the addresses that answered a dial-back.
        observed_host: our IP address as the checking peers see it.
        checked_by: the peers that dialed us back.
        failures: "address: reason" for each address that did not answer.
    """

    status: str
    reachable: tuple[Multiaddr, ...] = ()
    observed_host: str | None = None
    checked_by: tuple[PeerID, ...] = ()
    failures: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reachable": [str(m) for m in self.reachable],
            "observed_host": self.observed_host,
            "checked_by": [str(p) for p in self.checked_by],
            "failures": list(self.failures),
        }


class DialbackService:
    """Serves `net.dialback` for a Host: bounded, and only towards the asker's own IP."""

    def __init__(self, host: Host):
        self._host = host
        self._last: dict[tuple[str, PeerID], float] = {}  # (IP, peer) -> when we last dialed it back
        self._slots = asyncio.Semaphore(_MAX_CONCURRENT)

    async def handle(self, conn: Connection, payload: Any, body: bytes) -> dict[str, Any]:
        observed = conn.remote_host
        try:
            ip = ipaddress.ip_address(observed)
        except ValueError:  # a relayed connection: its IP is the relay's, not the asker's
            raise PeerUnreachableError("dial-back is only possible over a direct connection") from None
        addrs = payload.get("addrs") if isinstance(payload, dict) else None
        if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
            raise ConfigError("net.dialback needs a list of address strings")
        now, key = time.monotonic(), (observed, conn.remote_peer)
        if now - self._last.get(key, -_MIN_INTERVAL) < _MIN_INTERVAL:
            raise PeerUnreachableError(f"a dial-back for this peer ran less than {_MIN_INTERVAL:g} s ago")
        self._last[key] = now
        if len(self._last) > 4096:
            self._last = {k: t for k, t in self._last.items() if now - t < _MIN_INTERVAL}
        targets = _dialback_targets(addrs, ip)
        async with self._slots:
            results = await asyncio.gather(*(self._probe(conn.remote_peer, m) for m in targets))
        return {"observed": observed, "results": [[str(m), reason] for m, reason in zip(targets, results, strict=True)]}

    async def _probe(self, peer: PeerID, maddr: Multiaddr) -> str | None:
        try:
            async with _timeout(DIALBACK_TIMEOUT):  # in this task: a cancelled handler leaves no orphan
                await self._host.probe(maddr.with_peer_id(peer))
        except asyncio.TimeoutError:
            return f"no answer within {DIALBACK_TIMEOUT:g} s"
        except (HiveError, OSError) as e:
            return str(e) or type(e).__name__
        return None


def _dialback_targets(addrs: list[str], observed: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[Multiaddr]:
    """The addresses a dial-back tries: the asker's announced ports at its observed IP, and the
    announced addresses on that IP; never anywhere else."""
    protocol = "ip4" if observed.version == 4 else "ip6"
    targets: list[Multiaddr] = []
    for text in addrs[:MAX_DIALBACK_ADDRS]:
        try:
            maddr = Multiaddr.parse(text)
        except ConfigError:
            continue
        if maddr.relay is not None or maddr.port <= 0:
            continue
        candidate = Multiaddr(protocol, str(observed), maddr.port)
        if candidate not in targets:
            targets.append(candidate)
    return targets[:MAX_DIALBACK_ADDRS]


async def check_reachability(host: Host, helpers: list[PeerID], timeout: float = 10.0) -> ReachabilityReport:
    """Ask up to two of `helpers` to dial us back at our direct addresses.

    Returns "unknown" when no helper answered (none given, all gone, or all refused).
    """
    ours = [m for m in host.direct_maddrs() if not m.is_loopback] or host.direct_maddrs()
    wanted = [m.transport_address for m in ours][:MAX_DIALBACK_ADDRS]
    reachable: list[Multiaddr] = []
    failures: list[str] = []
    checked_by: list[PeerID] = []
    observed: str | None = None
    for helper in helpers:
        if len(checked_by) >= 2 or (checked_by and reachable):
            break
        try:
            async with _timeout(timeout):
                conn = await host.connect(helper)
            answer = (await conn.call("net.dialback", {"addrs": wanted}, timeout=timeout)).payload
            results = answer["results"]
            observed = str(answer["observed"])
        except (HiveError, asyncio.TimeoutError, OSError, KeyError, TypeError) as e:
            logger.debug("Peer %s did not check our reachability: %s", helper, e or type(e).__name__)
            continue
        checked_by.append(helper)
        for item in results if isinstance(results, list) else []:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                continue
            try:
                maddr = Multiaddr.parse(item[0])
            except ConfigError:
                continue
            if item[1] is None:
                if maddr not in reachable:
                    reachable.append(maddr)
            else:
                failures.append(f"{maddr} (checked by {helper}): {item[1]}")
    if not checked_by:
        return ReachabilityReport(UNKNOWN)
    status = PUBLIC if reachable else UNREACHABLE
    return ReachabilityReport(status, tuple(reachable), observed, tuple(checked_by), tuple(failures))


def advice(report: ReachabilityReport, listen_port: int | None, relayed: bool) -> str:
    """One paragraph telling the user what the report means and what to do about it."""
    if report.status == PUBLIC:
        return f"Reachable from other peers at {', '.join(str(m) for m in report.reachable)}."
    if report.status == UNKNOWN:
        return "Reachability not checked yet: no other peer could dial us back (it is checked again later)."
    port = str(listen_port) if listen_port else "the port this peer listens on (set a fixed one with --port)"
    where = f" as {report.observed_host}" if report.observed_host else ""
    fix = (
        f"To accept connections, forward TCP port {port} on your router (or open it in the firewall) to this "
        f"machine, then pass --announce {report.observed_host or 'PUBLIC_IP'}:{listen_port or 'PORT'}."
    )
    now = (
        "Until then this peer is reachable through a relay (another peer forwards its encrypted traffic)."
        if relayed
        else "Until then it runs as a client: it trains and averages through connections it opens itself."
    )
    return f"Other peers cannot dial this peer (they see it{where}). {fix} {now}"


__all__ = [
    "PUBLIC",
    "UNKNOWN",
    "UNREACHABLE",
    "DialbackService",
    "ReachabilityReport",
    "advice",
    "check_reachability",
]
