"""Recovery after a network partition, over MemoryTransport's simulated partitions.

Every peer has its own transport and host address (10.0.0.N), so that `Network.partition` can cut
one off: its dials then hang and its bytes are held, as dropped packets would be, until `heal`.
Tests wait on conditions with deadlines and print how long recovery took (no wall-clock
thresholds: the machine may be slow).
"""

import asyncio
import logging
import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch

from hivecli import DHT
from hivecli._exceptions import AllreduceError, MatchmakingError, PeerUnreachableError
from hivecli.averaging import DecentralizedAverager
from hivecli.dht import DHTNode, DHTSettings
from hivecli.dht.routing import DHTID
from hivecli.net import Host, MemoryTransport
from hivecli.net.multiaddr import Multiaddr
from hivecli.testing import shutdown_all, wait_for, wait_until
from hivecli.utils.timing import get_dht_time

# small timeouts, so that a partitioned peer loses its routing table within a second or two
FAST_DHT = {"wait_timeout": 0.5, "refresh_period": 0.5, "blacklist_time": 0.5}


def test_partitioned_streams_hold_bytes_until_the_heal_and_dials_time_out():
    async def scenario() -> None:
        network = MemoryTransport.Network()
        a, b = MemoryTransport(network), MemoryTransport(network)
        accepted: asyncio.Queue = asyncio.Queue()
        listener = await b.listen("10.0.0.2", 0, accepted.put)
        await a.listen("10.0.0.1", 0, accepted.put)
        port = listener.bound[0][1]
        ours = await a.dial("10.0.0.2", port, timeout=1.0)
        theirs = await asyncio.wait_for(accepted.get(), 5)
        network.partition({"10.0.0.1"})
        ours.write(b"held ")
        ours.write(b"in order")
        with pytest.raises(PeerUnreachableError, match="timed out"):
            await a.dial("10.0.0.2", port, timeout=0.2)
        assert theirs._reader.at_eof() is False and not theirs._reader._buffer  # nothing got through
        network.heal()
        assert await asyncio.wait_for(theirs.read_exactly(13), 5) == b"held in order"
        ours.close()
        with pytest.raises(asyncio.IncompleteReadError):
            await asyncio.wait_for(theirs.read_exactly(1), 5)

    asyncio.run(scenario())


def test_a_banned_peer_that_reaches_us_is_unbanned_only_if_it_answers():
    """An honest peer banned for silence (say, across a healed partition) is let back as soon
    as it contacts us and answers a ping; a tarpit that contacts us but never answers is not."""
    settings = DHTSettings(wait_timeout=0.3)

    async def scenario() -> None:
        network = MemoryTransport.Network()
        loopback = [Multiaddr.parse("/ip4/127.0.0.1/tcp/0")]
        node = await DHTNode.create(Host(transport=MemoryTransport(network)), host_maddrs=loopback, settings=settings)
        honest = await DHTNode.create(Host(transport=MemoryTransport(network)), host_maddrs=loopback, settings=settings)
        tarpit = Host(transport=MemoryTransport(network))
        await tarpit.listen(loopback)

        async def never_answer(stream, payload, body):
            await asyncio.sleep(3600)

        tarpit.add_unary_handler("dht.ping", never_answer)
        try:
            for peer in (honest.peer_id, tarpit.peer_id):
                node.protocol.blacklist.register_failure(peer)  # banned for silence
            target = node.host.visible_maddrs()[0]
            await honest.protocol.call_ping(target)
            await tarpit.call(target, "dht.ping", {"node": DHTID.generate().to_bytes_()})
            await wait_until(lambda: not node.protocol._pinging, 10, "the checks to finish")
            assert not node.protocol.blacklist.is_banned(honest.peer_id)
            assert node.protocol.blacklist.is_banned(tarpit.peer_id)
        finally:
            await tarpit.aclose()
            await honest.shutdown()
            await node.shutdown()

    asyncio.run(scenario())


def start_dht(network: MemoryTransport.Network, index: int, *initial: DHT, **settings) -> DHT:
    initial_peers = [str(m) for dht in initial for m in dht.get_visible_maddrs()]
    return DHT(
        initial_peers=initial_peers,
        start=True,
        host_maddrs=[f"/ip4/10.0.0.{index}/tcp/0"],
        transport=MemoryTransport(network),
        **settings,
    )


def read_node(dht: DHT, read):
    """`read(node)` evaluated on the DHT's own loop."""

    async def call(_dht, node):
        return read(node)

    return dht.run_coroutine(call)


def table_peers(dht: DHT) -> set:
    return read_node(dht, lambda node: {peer for _, peer in node.protocol.routing_table})


def test_cut_off_peer_rejoins_through_a_peer_that_was_not_its_initial_peer(caplog):
    caplog.set_level(logging.INFO, logger="hivecli.dht.rejoin")
    network = MemoryTransport.Network()
    dhts = []
    try:
        dhts.append(start_dht(network, 1, **FAST_DHT))
        for index in (2, 3, 4):
            dhts.append(start_dht(network, index, dhts[0], **FAST_DHT))
        initial = dhts[1]
        loner = start_dht(network, 5, initial, **FAST_DHT)  # knows only peer 2 to begin with
        dhts.append(loner)
        stayers = {dht.peer_id for dht in dhts[:4]}
        wait_for(lambda: table_peers(loner) == stayers, timeout=20, what="the loner to know all four peers")

        network.partition({"10.0.0.5"})
        wait_for(lambda: not table_peers(loner), timeout=20, what="the loner to lose its routing table")
        wait_for(
            lambda: all(loner.peer_id not in table_peers(dht) for dht in dhts[:4]),
            timeout=20,
            what="the others to drop the loner",
        )
        initial.shutdown()  # the loner's only initial peer is gone for good
        said = wait_for(
            lambda: [r for r in list(caplog.records) if "Cut off from the DHT" in r.getMessage()],
            timeout=20,
            what="the loner to say it is cut off",
        )
        assert said[0].exc_info is None and "\n" not in said[0].getMessage()  # one line, no traceback
        healed = time.monotonic()
        network.heal()

        wait_for(lambda: read_node(loner, lambda node: node.rejoins) >= 1, timeout=20, what="the loner to re-join")
        rejoined = time.monotonic() - healed
        back = wait_for(lambda: table_peers(loner), timeout=20, what="the loner's routing table to refill")
        print(f"\nheal -> re-joined the DHT: {rejoined:.2f} s")
        assert back <= stayers - {initial.peer_id}
        # the others take it back, lift the bans they put on it for not answering, and data flows both ways
        others = [dhts[0], dhts[2], dhts[3]]
        wait_for(
            lambda: all(loner.peer_id in table_peers(dht) for dht in others),
            timeout=20,
            what="the others to take it back",
        )

        def unbanned(dht: DHT) -> bool:
            return not read_node(dht, lambda node: node.protocol.blacklist.is_banned(loner.peer_id))

        wait_for(lambda: all(unbanned(dht) for dht in others), timeout=20, what="the others to lift their bans")
        assert loner.store("after-heal", "from the loner", get_dht_time() + 60)
        assert dhts[3].get("after-heal", latest=True).value == "from the loner"
        lines = [r.getMessage() for r in caplog.records if "Re-joined the DHT" in r.getMessage()]
        assert len(lines) == 1 and "through peer" in lines[0] and str(initial.peer_id) not in lines[0], lines
    finally:
        shutdown_all(dhts)


def test_a_peer_whose_neighbours_all_stop_answering_rejoins_before_its_table_empties(caplog):
    """No maintenance runs (refresh_period is long): the cut-off is noticed from unanswered
    requests while the routing table still lists peers, and the peer re-joins after the heal."""
    caplog.set_level(logging.INFO, logger="hivecli.dht.rejoin")
    settings = DHTSettings(wait_timeout=0.5, refresh_period=600)

    async def scenario() -> float:
        network = MemoryTransport.Network()

        async def node(index: int, *initial: DHTNode) -> DHTNode:
            maddrs = [Multiaddr.parse(f"/ip4/10.0.0.{index}/tcp/0")]
            peers = [m for other in initial for m in other.host.visible_maddrs()]
            host = Host(transport=MemoryTransport(network))
            return await DHTNode.create(host, initial_peers=peers, host_maddrs=maddrs, settings=settings)

        nodes = [await node(1)]
        try:
            for index in range(2, 10):
                nodes.append(await node(index, nodes[0]))
            cut = nodes[-1]
            await wait_until(lambda: len(cut.protocol.routing_table) == 8, 20, "the peer to know all eight others")
            network.partition({"10.0.0.9"})
            neighbours = [peer for _, peer in cut.protocol.routing_table][:4]
            await asyncio.gather(*(cut.protocol.call_ping(peer) for peer in neighbours))  # all four unanswered
            assert len(cut.protocol.routing_table) == 4
            await wait_until(
                lambda: any("requests went unanswered" in r.getMessage() for r in caplog.records),
                20,
                "the peer to find itself cut off",
            )
            assert len(cut.protocol.routing_table) == 4  # re-join pings that fail drop nobody
            healed = time.monotonic()
            network.heal()
            await wait_until(lambda: cut.rejoins == 1, 20, "the peer to re-join")
            rejoined = time.monotonic() - healed
            await wait_until(lambda: len(cut.protocol.routing_table) == 8, 20, "the peer to know all eight again")
            assert not any(cut.protocol.blacklist.is_banned(peer) for peer in neighbours)  # silence forgiven
            return rejoined
        finally:
            for each in reversed(nodes):
                await each.shutdown()

    rejoined = asyncio.run(scenario())
    print(f"\nheal -> re-joined the DHT (stale table): {rejoined:.2f} s")
    assert any("Re-joined the DHT through peer" in r.getMessage() for r in caplog.records)


def test_a_healed_averager_is_back_in_full_rounds():
    network = MemoryTransport.Network()
    dhts: list[DHT] = []
    avs: list[DecentralizedAverager] = []
    rounds: list[tuple[float, int, int]] = []  # (when it ended, peer, group size)
    lonely: list[tuple[float, int]] = []  # (when it began, peer) of steps that found no group
    stop = threading.Event()

    def keep_averaging(index: int) -> None:
        while not stop.is_set():
            began = time.monotonic()
            try:
                result = avs[index].step(timeout=3.0)
            except MatchmakingError:
                lonely.append((began, index))
                continue
            except (AllreduceError, CancelledError):  # cancelled: the averager shut down
                continue
            rounds.append((time.monotonic(), index, len(result)))

    def full_round_by(peer: int, after: float) -> float | None:
        return next((when for when, who, size in list(rounds) if who == peer and size == 3 and when > after), None)

    workers = [threading.Thread(target=keep_averaging, args=(i,), daemon=True) for i in range(3)]
    try:
        dhts.append(start_dht(network, 1, wait_timeout=0.5))
        dhts += [start_dht(network, i, dhts[0], wait_timeout=0.5) for i in (2, 3)]
        for dht in dhts:
            avs.append(
                DecentralizedAverager(
                    [torch.zeros(16)],
                    dht,
                    prefix="recovery",
                    target_group_size=3,
                    min_matchmaking_time=1.0,
                    request_timeout=0.5,
                    next_chunk_timeout=1.0,
                    allreduce_timeout=5.0,
                    start=True,
                )
            )
        for worker in workers:
            worker.start()
        wait_for(lambda: full_round_by(2, 0.0), timeout=30, what="a first round of all three")

        cut_at = time.monotonic()
        network.partition({"10.0.0.3"})
        wait_for(lambda: not table_peers(dhts[2]), timeout=30, what="the cut-off peer to lose its routing table")
        wait_for(
            lambda: any(when > cut_at and size == 2 for when, _, size in list(rounds)),
            timeout=30,
            what="the other two to average as a pair",
        )
        # a whole step of the cut-off peer found nobody: no round from before the cut is left over
        wait_for(
            lambda: any(when > cut_at and peer == 2 for when, peer in list(lonely)),
            timeout=30,
            what="a step of the cut-off peer to find no group",
        )

        healed = time.monotonic()
        network.heal()
        wait_for(lambda: read_node(dhts[2], lambda node: node.rejoins) >= 1, timeout=30, what="the re-join")
        rejoined = time.monotonic() - healed
        back = wait_for(lambda: full_round_by(2, healed), timeout=30, what="a round of all three after the heal")
        print(f"\nheal -> re-joined the DHT: {rejoined:.2f} s; heal -> first round of all three: {back - healed:.2f} s")
    finally:
        stop.set()
        for av in avs:
            av.shutdown()
        for worker in workers:
            worker.join(timeout=30)
        shutdown_all(dhts)
