"""Bulk links (hivecli.net.bulk): a transfer's own TCP connection, redeemed with a one-time token."""

import asyncio
import contextlib
import dataclasses
import time

import pytest
import torch

from hivecli._exceptions import ConnectionClosedError, PeerUnreachableError, ProtocolError, RPCTimeoutError
from hivecli.net import Host, MemoryTransport, Multiaddr, NetSettings
from hivecli.net.bulk import TOKEN_BYTES, BulkOffer, dial
from hivecli.net.framing import PREFIX
from hivecli.net.secure import SecuritySettings


@contextlib.asynccontextmanager
async def two_hosts(encrypt=True):
    settings = NetSettings(security=SecuritySettings(encrypt=encrypt))
    a, b = Host(settings=settings), Host(settings=settings)
    try:
        await a.listen([Multiaddr.parse("/ip4/127.0.0.1/tcp/0")])
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def linked(a, b):
    """(a's end, b's end) of a link a offered and b dialed."""
    offer, redeemed = a.bulk.offer("b")
    where = a.listen_maddrs[0]
    b_end = await dial(b.transport, where.host, where.port, offer, 5.0, b.settings.limits, "a")
    return await asyncio.wait_for(redeemed, 5.0), b_end


@pytest.mark.parametrize("encrypt", [True, False], ids=["sealed", "plaintext"])
def test_messages_land_in_the_receivers_buffer(encrypt):
    async def main():
        async with two_hosts(encrypt) as (a, b):
            a_end, b_end = await linked(a, b)
            source = torch.randn(3_000_000)  # 12 MB: several sealed records per message
            target = torch.zeros_like(source)
            src, dst = memoryview(source.numpy()).cast("B"), memoryview(target.numpy()).cast("B")
            chunk = 4 * 1024 * 1024

            async def send():
                for start in range(0, len(src), chunk):
                    await b_end.send([start, "meta"], src[start : start + chunk])
                await b_end.send({"done": True})

            async def receive():
                checked = []
                while True:
                    message, seen = await a_end.recv(
                        lambda payload, n: dst[payload[0] : payload[0] + n] if isinstance(payload, list) else None,
                        timeout=10,
                        check=lambda payload, body: len(body),
                    )
                    if message.payload == {"done": True}:
                        return checked
                    assert message.payload[1] == "meta"
                    checked.append(seen)

            _, sizes = await asyncio.gather(send(), receive())
            assert torch.equal(source, target)
            assert sum(sizes) == source.numel() * 4
            assert a_end.bytes_received == b_end.bytes_sent > source.numel() * 4
            # and the other way, on the same link at once
            reply = asyncio.ensure_future(b_end.recv(timeout=5))
            await a_end.send("pong", b"x" * 100)
            message, _ = await reply
            assert message == ("pong", b"x" * 100)
            a_end.close()
            b_end.close()

    asyncio.run(main())


def test_a_token_works_once_and_a_made_up_one_not_at_all():
    async def main():
        async with two_hosts() as (a, b):
            where = a.listen_maddrs[0]
            made_up = BulkOffer(b"\x01" * TOKEN_BYTES)
            with pytest.raises(PeerUnreachableError):
                await dial(b.transport, where.host, where.port, made_up, 2.0, b.settings.limits, "a")
            a_end, b_end = await linked(a, b)
            offer, _ = a.bulk.offer("b")
            a.bulk.withdraw(offer.token)  # what a reducer does once the sender chose
            with pytest.raises(PeerUnreachableError):
                await dial(b.transport, where.host, where.port, offer, 2.0, b.settings.limits, "a")
            # the host still serves ordinary connections
            conn = await b.connect(Multiaddr.parse(f"{where}/p2p/{a.peer_id}"))
            assert conn.remote_peer == a.peer_id
            a_end.close()
            b_end.close()

    asyncio.run(main())


def test_a_record_sealed_with_another_key_breaks_the_link():
    async def main():
        async with two_hosts() as (a, b):
            offer, redeemed = a.bulk.offer("b")
            assert offer.keys is not None
            wrong = BulkOffer(offer.token, (offer.keys[0][::-1], offer.keys[1]))
            where = a.listen_maddrs[0]
            b_end = await dial(b.transport, where.host, where.port, wrong, 5.0, b.settings.limits, "a")
            a_end = await asyncio.wait_for(redeemed, 5)
            await b_end.send("hello", b"payload")
            with pytest.raises(ProtocolError, match="integrity check failed"):
                await a_end.recv(timeout=5)
            with pytest.raises(ConnectionClosedError):  # nothing after a bad record is trusted
                await a_end.recv(timeout=5)
            b_end.close()

    asyncio.run(main())


def test_a_frame_over_the_limits_is_refused_before_it_is_read():
    async def main():
        async with two_hosts(encrypt=False) as (a, b):
            a_end, b_end = await linked(a, b)
            b_end._sock.sendall(PREFIX.pack(10, a.settings.limits.max_body_bytes + 1))
            with pytest.raises(ProtocolError, match="over the limits"):
                await a_end.recv(timeout=5)
            b_end.close()

    asyncio.run(main())


def test_a_quiet_peer_times_out_and_close_wakes_a_blocked_receive():
    async def main():
        async with two_hosts() as (a, b):
            a_end, b_end = await linked(a, b)
            with pytest.raises(RPCTimeoutError):
                await a_end.recv(timeout=0.3)
            b_end.close()
            a_end, b_end = await linked(a, b)
            waiting = asyncio.ensure_future(b_end.recv(timeout=None))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            a_end.close()  # b's receive sees the end of the stream
            with pytest.raises(ConnectionClosedError):
                await asyncio.wait_for(waiting, 5)
            assert time.monotonic() - started < 5
            b_end.close()

    asyncio.run(main())


def test_streams_that_cannot_leave_the_loop_make_the_dial_fail_and_are_remembered():
    async def main():
        network = MemoryTransport.Network()
        a, b = Host(transport=MemoryTransport(network)), Host(transport=MemoryTransport(network))
        try:
            await a.listen([Multiaddr.parse("/ip4/10.0.0.1/tcp/4000")])
            offer, redeemed = a.bulk.offer("b")
            assert await b.bulk.dial("a", [("10.0.0.1", 4000)], offer, 2.0) is None
            assert redeemed.cancelled()
            # not tried again for a while: the next offer is not even dialed
            offer, redeemed = a.bulk.offer("b")
            assert await b.bulk.dial("a", [("10.0.0.1", 4000)], offer, 2.0) is None
            assert not redeemed.done()
            a.bulk.withdraw(offer.token)
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(main())


def test_offers_expire():
    async def main():
        async with two_hosts() as (a, _):
            _, redeemed = a.bulk.offer("b", ttl=0.05)
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(redeemed, 5)

    asyncio.run(main())


def test_offer_wire_form_is_checked():
    offer = BulkOffer(b"t" * TOKEN_BYTES, (b"k" * 32, b"l" * 32))
    assert BulkOffer.from_wire(offer.to_wire()) == offer
    for bad in [None, [b"short", None], [b"t" * TOKEN_BYTES, [b"k" * 32, b"k" * 32]], [b"t" * TOKEN_BYTES, [1, 2]]]:
        with pytest.raises(ValueError):
            BulkOffer.from_wire(bad)
    assert dataclasses.replace(offer, keys=None).to_wire()[1] is None


def test_an_unsealed_offer_makes_a_link_only_between_two_ends_on_this_host(monkeypatch):
    """Where the swarm encrypts, an offer without keys (its connection runs unsealed, both peers
    on one host) is redeemed only by a connection whose two ends are on this host."""

    async def main():
        async with two_hosts() as (a, b):
            offer, redeemed = a.bulk.offer("b", sealed=False)
            assert offer.keys is None
            where = a.listen_maddrs[0]
            b_end = await b.bulk.dial("a", [(where.host, where.port)], offer, 5.0)
            a_end = await asyncio.wait_for(redeemed, 5.0)
            assert a_end.same_host and b_end.same_host
            await b_end.send("plain", b"bytes")
            assert (await a_end.recv(timeout=5))[0] == ("plain", b"bytes")
            a_end.close()
            b_end.close()

            # the same offer, were the link's ends on two hosts: the acceptor closes it unanswered
            monkeypatch.setattr("hivecli.net.bulk.same_host_socket", lambda sock: False)
            offer, redeemed = a.bulk.offer("b", sealed=False)
            with pytest.raises(PeerUnreachableError):
                await dial(b.transport, where.host, where.port, offer, 2.0, b.settings.limits, "a")
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(redeemed, 5.0)

    asyncio.run(main())


def test_a_dialer_that_encrypts_refuses_an_unsealed_link_off_this_host(monkeypatch):
    async def main():
        settings = NetSettings(security=SecuritySettings(encrypt=False))
        a, b = Host(settings=settings), Host(settings=NetSettings())
        try:
            await a.listen([Multiaddr.parse("/ip4/127.0.0.1/tcp/0")])
            offer, redeemed = a.bulk.offer("b")  # a does not encrypt: no keys
            assert offer.keys is None
            monkeypatch.setattr("hivecli.net.bulk.same_host_socket", lambda sock: False)
            where = a.listen_maddrs[0]
            assert await b.bulk.dial("a", [(where.host, where.port)], offer, 5.0) is None
            a_end = await asyncio.wait_for(redeemed, 5.0)  # a took it; b closed its end at once
            with pytest.raises(ConnectionClosedError):
                await a_end.recv(timeout=5)
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(main())
