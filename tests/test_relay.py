"""Relays, dial-back and the addresses a host gives out, between hosts on 127.0.0.1.

Network namespaces with a real NAT router are in tests/test_scenarios.py; here the hosts share
loopback, so "unreachable" is played by a host that does not listen at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hivecli._exceptions import PeerUnreachableError
from hivecli.net import Host, Multiaddr, NetSettings
from hivecli.net.connection import Connection
from hivecli.net.interfaces import select_addresses
from hivecli.net.reachability import PUBLIC, UNKNOWN, UNREACHABLE, ReachabilityReport, advice, check_reachability
from hivecli.net.relay import CHUNK_BYTES, RelaySettings
from hivecli.testing import wait_for, wait_until

LOOPBACK = Multiaddr.parse("/ip4/127.0.0.1/tcp/0")
RELAY = NetSettings(relay=RelaySettings(serve=True))


async def echo(conn: Connection, payload: Any, body: bytes) -> Any:
    return {"echo": payload, "from": str(conn.remote_peer), "via": conn.remote_host, "size": len(body)}


@contextlib.asynccontextmanager
async def hosts() -> AsyncIterator[list[Host]]:
    """A list to put the test's hosts in; all are closed at the end, whatever happened."""
    made: list[Host] = []
    try:
        yield made
    finally:
        await asyncio.gather(*(h.aclose() for h in made))


async def _host(made: list[Host], listen: bool, settings: NetSettings | None = None) -> Host:
    host = Host(settings=settings)
    host.add_unary_handler("echo", echo)
    if listen:
        await host.listen([LOOPBACK])
    made.append(host)
    return host


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_two_unreachable_hosts_talk_through_a_relay_which_sees_only_ciphertext() -> None:
    async def main() -> None:
        async with hosts() as made:
            relay = await _host(made, listen=True, settings=RELAY)
            b = await _host(made, listen=False)  # nobody can dial b: it listens nowhere
            a = await _host(made, listen=False)
            relay_addr = relay.visible_maddrs()[0]
            seen = bytearray()  # every byte the relay forwards
            forward = relay.relay._pipe

            async def spying(source: Any, sink: Any) -> None:
                receive = source.recv

                async def recording(*args: Any, **kwargs: Any) -> Any:
                    message = await receive(*args, **kwargs)
                    seen.extend(message.body)
                    return message

                source.recv = recording
                await forward(source, sink)

            relay.relay._pipe = spying  # type: ignore[method-assign]
            await b.connect(relay_addr)
            assert await b.relay_client.reserve([relay.peer_id]) == [relay.peer_id]
            circuit = b.visible_maddrs()[0]
            assert circuit.relay == relay.peer_id and circuit.peer_id == b.peer_id
            assert str(circuit).endswith(f"/p2p/{relay.peer_id}/p2p-circuit/p2p/{b.peer_id}")

            secret = b"the plaintext a relay must never see" * 1000
            reply = await a.call(circuit, "echo", {"x": 1}, body=secret)
            assert reply.payload == {"echo": {"x": 1}, "from": str(a.peer_id), "via": f"via relay {relay.peer_id}",
                                     "size": len(secret)}  # fmt: skip
            # b can call a back over the same circuit connection
            back = await b.call(a.peer_id, "echo", "hi")
            assert back.payload["from"] == str(b.peer_id)
            assert len(seen) > len(secret) and secret[:36] not in seen  # it carried the call, unreadable
            stats = relay.relay.stats
            assert stats.circuits == 1 and stats.circuits_total == 1 and stats.reservations == 1
            assert stats.bytes_relayed > len(secret)  # both ways, with record overhead

            # a large transfer goes through in CHUNK_BYTES messages, in order
            big = bytes(range(256)) * (3 * CHUNK_BYTES // 256 + 7)
            reply = await a.call(b.peer_id, "echo", None, body=big)
            assert reply.payload["size"] == len(big)

            # closing the circuit connection releases the relay's circuit
            a.connection_to(b.peer_id).close()
            await wait_until(lambda: relay.relay.stats.circuits == 0, 5.0, "the relay to drop the circuit")
            # b leaving frees its slot, and a can no longer reach it
            await b.aclose()
            await wait_until(lambda: relay.relay.stats.reservations == 0, 5.0, "the relay to drop b's slot")
            with pytest.raises(PeerUnreachableError, match="holds no slot"):
                await a.connect(circuit)

    run(main())


def test_a_peer_that_is_not_a_relay_refuses_reservations_and_circuits() -> None:
    async def main() -> None:
        async with hosts() as made:
            never = await _host(made, listen=True, settings=NetSettings(relay=RelaySettings(serve=False)))
            b = await _host(made, listen=False)
            await b.connect(never.visible_maddrs()[0])
            assert await b.relay_client.reserve([never.peer_id]) == []
            assert never.relay.stats.refused == 1
            fake = never.visible_maddrs()[0].via(never.peer_id).with_peer_id(b.peer_id)
            a = await _host(made, listen=False)
            with pytest.raises(PeerUnreachableError, match="not a relay"):
                await a.connect(fake)
            # serve=None (the default): a relay unless a dial-back found it unreachable
            auto = await _host(made, listen=True)
            await b.connect(auto.visible_maddrs()[0])
            auto.set_reachability(ReachabilityReport(UNREACHABLE))
            assert await b.relay_client.reserve([auto.peer_id]) == []
            auto.set_reachability(ReachabilityReport(PUBLIC, (auto.visible_maddrs()[0],)))
            assert await b.relay_client.reserve([auto.peer_id]) == [auto.peer_id]

    run(main())


def test_relay_caps_circuits() -> None:
    async def main() -> None:
        async with hosts() as made:
            relay = await _host(
                made, listen=True, settings=NetSettings(relay=RelaySettings(serve=True, max_circuits=1))
            )
            b = await _host(made, listen=False)
            await b.connect(relay.visible_maddrs()[0])
            await b.relay_client.reserve([relay.peer_id])
            circuit = b.visible_maddrs()[0]
            first, second = await _host(made, listen=False), await _host(made, listen=False)
            await first.call(circuit, "echo", 1)
            with pytest.raises(PeerUnreachableError, match="circuit limit"):
                await second.connect(circuit)

    run(main())


def test_one_peer_cannot_take_every_circuit_of_a_relay() -> None:
    from hivecli._exceptions import RemoteError
    from hivecli.net.relay import MAX_CIRCUITS_PER_PEER

    async def main() -> None:
        async with hosts() as made:
            relay = await _host(made, listen=True, settings=RELAY)
            b = await _host(made, listen=False)
            await b.connect(relay.visible_maddrs()[0])
            await b.relay_client.reserve([relay.peer_id])
            greedy = await _host(made, listen=False)
            conn = await greedy.connect(relay.visible_maddrs()[0])
            target = {"target": b.peer_id.to_bytes()}
            streams = [await conn.open_stream("relay.connect", target) for _ in range(MAX_CIRCUITS_PER_PEER)]
            for stream in streams:
                assert (await stream.recv(timeout=5)).payload == {"ok": True}
            extra = await conn.open_stream("relay.connect", target)
            with pytest.raises(RemoteError, match="already has 8 circuits"):
                await extra.recv(timeout=5)
            assert relay.relay.stats.circuits == MAX_CIRCUITS_PER_PEER

    run(main())


def test_dialback_finds_a_listening_host_reachable_and_a_closed_port_not() -> None:
    async def main() -> None:
        async with hosts() as made:
            helper = await _host(made, listen=True)
            ours = await _host(made, listen=True)
            await ours.connect(helper.visible_maddrs()[0])
            report = await check_reachability(ours, [helper.peer_id])
            assert report.status == PUBLIC and report.checked_by == (helper.peer_id,)
            assert report.observed_host == "127.0.0.1"
            assert [m.port for m in report.reachable] == [ours.listen_maddrs[0].port]
            assert "Reachable from other peers" in advice(report, 4000, relayed=False)

            # a host whose announced port nobody listens on: unreachable, with the reason and advice
            closed = await _host(made, listen=False)
            closed.announce_maddrs = [Multiaddr.parse("/ip4/127.0.0.1/tcp/9")]  # discard port: nothing listens
            await closed.connect(helper.visible_maddrs()[0])
            await asyncio.sleep(0)  # the helper's per-IP dial-back interval: a fresh helper instead
            helper2 = await _host(made, listen=True)
            await closed.connect(helper2.visible_maddrs()[0])
            report = await check_reachability(closed, [helper2.peer_id])
            assert report.status == UNREACHABLE and not report.reachable
            assert report.failures and "/ip4/127.0.0.1/tcp/9" in report.failures[0]
            text = advice(report, 9, relayed=False)
            assert "forward TCP port 9" in text and "runs as a client" in text
            assert (await check_reachability(closed, [])).status == UNKNOWN

    run(main())


def test_dialback_only_dials_the_asking_peers_own_ip() -> None:
    from hivecli.net.reachability import _dialback_targets

    observed = ipaddress.ip_address("198.51.100.7")
    targets = _dialback_targets(
        ["/ip4/10.0.0.5/tcp/4000", "/ip4/203.0.113.9/tcp/5000", "/dns/example.com/tcp/6000", "garbage"], observed
    )
    assert [str(t) for t in targets] == [
        "/ip4/198.51.100.7/tcp/4000",
        "/ip4/198.51.100.7/tcp/5000",
        "/ip4/198.51.100.7/tcp/6000",
    ]
    assert len(_dialback_targets([f"/ip4/10.0.0.5/tcp/{p}" for p in range(1, 100)], observed)) == 8


def test_addresses_given_out_fit_the_peer_that_asks() -> None:
    m = Multiaddr.parse
    loop, lan, pub = m("/ip4/127.0.0.1/tcp/1"), m("/ip4/192.168.1.5/tcp/1"), m("/ip4/5.6.7.8/tcp/1")
    relay_id = Host().peer_id
    circuit = m("/ip4/198.51.100.1/tcp/2").via(relay_id)
    nets = [ipaddress.ip_network("192.168.1.0/24"), ipaddress.ip_network("127.0.0.0/8")]
    unknown, unreachable = ReachabilityReport(UNKNOWN), ReachabilityReport(UNREACHABLE)
    direct = [pub, lan, loop]
    # never loopback to another machine; private addresses not to a public peer
    assert select_addresses(direct, [], unknown, "1.2.3.4", nets) == [pub]
    assert select_addresses(direct, [], unknown, "192.168.7.7", nets) == [pub, lan]
    assert select_addresses(direct, [], unknown, "127.0.0.1", nets) == direct
    assert select_addresses(direct, [], unknown, None, nets) == [pub, lan]
    assert select_addresses([loop], [], unknown, None, nets) == [loop]  # a swarm on one machine
    # unreachable: direct addresses only to a LAN neighbour; everyone else gets the circuit
    assert select_addresses([lan], [circuit], unreachable, "192.168.1.9", nets) == [lan, circuit]
    assert select_addresses([lan], [circuit], unreachable, "10.9.9.9", nets) == [circuit]
    assert select_addresses([lan], [circuit], unreachable, None, nets) == [circuit]
    # a confirmed address comes first
    confirmed = ReachabilityReport(PUBLIC, (lan,))
    assert select_addresses([pub, lan], [], confirmed, "192.168.1.9", nets) == [lan, pub]


def test_dht_peers_check_reachability_and_two_unreachable_ones_average_through_a_relay() -> None:
    """Two peers whose announced ports nobody listens on (as behind NAT) find out by dial-back,
    stop serving the DHT, reserve slots on the reachable first peer, and average with each
    other through it: the relay counts the bytes."""
    import torch

    from hivecli import DHT
    from hivecli.averaging import DecentralizedAverager

    first = DHT(start=True, check_reachability=True)
    nated: list[DHT] = []
    avs: list[DecentralizedAverager] = []
    try:
        entry = [str(m) for m in first.get_visible_maddrs()]
        assert first.reachability.status == UNKNOWN  # alone: nobody to ask yet
        for _ in range(2):
            closed_port = ["/ip4/127.0.0.1/tcp/9"]  # nothing listens there: dial-backs fail, as behind NAT
            nated.append(DHT(initial_peers=entry, start=True, check_reachability=True, announce_maddrs=closed_port))
        for dht in nated:
            assert dht.reachability.status == UNREACHABLE and dht.relayed and not dht.client_mode
            assert dht.node.client_mode  # it does not serve the DHT: nobody could dial it
            visible = dht.get_visible_maddrs()
            assert [m.relay for m in visible] == [first.peer_id] and visible[0].peer_id == dht.peer_id
        # the first peer got checked by the newcomers in the meantime
        wait_for(lambda: first.reachability.status == PUBLIC, 15, "the first peer's own dial-back")
        relay = first.node.host.relay
        assert relay.stats.reservations == 2
        for i, dht in enumerate(nated):
            avs.append(DecentralizedAverager([torch.full((1000,), float(i))], dht, prefix="nat", target_group_size=2,
                                             min_matchmaking_time=2.0, request_timeout=1.0, start=True))  # fmt: skip
        before = relay.stats.bytes_relayed
        controls = [av.step(wait=False, timeout=30) for av in avs]
        results = [c.result(timeout=60) for c in controls]
        assert all(r is not None and len(r) == 2 for r in results)
        for av in avs:
            with av.get_tensors() as (tensor,):
                assert torch.allclose(tensor, torch.full((1000,), 0.5))
        assert relay.stats.bytes_relayed - before > 4000  # the tensors crossed the relay

        # `hive peers` (the crawl) lists the NATed peers, which no routing table names, through their relay
        from hivecli.dht.crawl import crawl

        with DHT(client_mode=True) as client:
            start = first.get_visible_maddrs()[0]
            found = {info.peer_id: info for info in client.run_coroutine(lambda _d, node: crawl(node, start))}
        assert set(found) == {first.peer_id, *(d.peer_id for d in nated)}
        assert found[first.peer_id].net["relay"]["reservations"] == 2
        assert found[first.peer_id].net["relay"]["bytes"] > 4000
        for dht in nated:
            assert found[dht.peer_id].net["relays"] == [first.peer_id]
            assert found[dht.peer_id].net["reachability"] == UNREACHABLE
    finally:
        for av in avs:
            av.shutdown()
        for dht in [*nated, first]:
            dht.shutdown()


def test_a_stale_dial_nobody_waits_for_is_not_joined_by_a_new_caller() -> None:
    """After an outage, a dial whose SYNs were lost must not keep later callers waiting for the
    kernel's next backed-off resend; but a recent one is joined: on a busy machine a handshake
    may outlast a short timeout, and dialing afresh each time would never connect."""
    from hivecli.net.host import STALE_DIAL_S
    from hivecli.net.transport import ByteStream, Listener, Transport

    class Blackhole(Transport):
        dials = 0

        async def listen(self, host: str, port: int, handler: Any) -> Listener:
            raise OSError("not used")

        async def dial(self, host: str, port: int, timeout: float) -> ByteStream:
            self.dials += 1
            await asyncio.sleep(3600)  # SYNs into the void
            raise AssertionError("unreachable")

    async def attempt(host: Host, target: Multiaddr) -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(host.connect(target), 0.05)

    async def main() -> None:
        transport = Blackhole()
        host = Host(transport=transport)
        target = Multiaddr.parse("/ip4/10.1.2.3/tcp/4000").with_peer_id(Host().peer_id)
        try:
            await attempt(host, target)
            await attempt(host, target)
            assert transport.dials == 1  # the second caller joined the recent dial
            await asyncio.sleep(STALE_DIAL_S)  # the dial is now older than the first SYN resend
            await attempt(host, target)
            assert transport.dials == 2  # and so the next caller dialed afresh
        finally:
            await host.aclose()  # stops both dials

    run(main())


def test_a_peer_behind_nat_moves_to_another_relay_when_its_relay_leaves() -> None:
    from hivecli import DHT, get_dht_time

    first = DHT(start=True, check_reachability=True)
    others: list[DHT] = []
    try:
        entry = [str(m) for m in first.get_visible_maddrs()]
        hidden = DHT(initial_peers=entry, start=True, check_reachability=True, announce_maddrs=["/ip4/127.0.0.1/tcp/9"])
        others.append(hidden)
        assert hidden.relayed and [m.relay for m in hidden.get_visible_maddrs()] == [first.peer_id]
        second = DHT(initial_peers=entry, start=True, check_reachability=True)
        others.append(second)
        # a peer learns of others as it uses the DHT (a training peer stores progress every few seconds)
        wait_for(
            lambda: hidden.store("ping", 1, get_dht_time() + 60) and hidden.run_coroutine(_knows(second.peer_id)),
            10,
            "the NATed peer to learn of the second",
        )
        first.shutdown()
        wait_for(
            lambda: [m.relay for m in hidden.get_visible_maddrs()] == [second.peer_id], 20, "a move to the second relay"
        )
        assert hidden.relayed and second.node.host.relay.stats.reservations == 1
    finally:
        for dht in [*others, first]:
            dht.shutdown()


def _knows(peer: Any) -> Any:
    async def check(_dht: Any, node: Any) -> bool:
        return any(p == peer for _, p in node.protocol.routing_table)

    return check
