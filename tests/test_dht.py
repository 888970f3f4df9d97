"""The DHT through its public API, on real loopback TCP (and once over the in-memory transport)."""

import asyncio
import random
import socket
import struct

import pytest

import hivecli as hivemind
from hivecli import BootstrapError, ConfigError, MultiaddrError
from hivecli.dht import DHTNode, DHTSettings
from hivecli.dht.routing import DHTID
from hivecli.net import Host, Identity, MemoryTransport
from hivecli.testing import launch_swarm, local_swarm, shutdown_all, wait_for

FAST = {"wait_timeout": 1.0}


@pytest.fixture(scope="module")
def swarm():
    with local_swarm(12, seed=1, **FAST) as dhts:
        yield dhts


def test_store_and_get_across_nodes(swarm):
    rng = random.Random(2)
    now = hivemind.get_dht_time()
    values = {f"key-{i}": v for i, v in enumerate([1, "text", b"\x00bytes", [1, 2.5, None], {"a": [1, {"b": 2}]}])}
    for key, value in values.items():
        assert rng.choice(swarm).store(key, value, now + 60)
    for key, value in values.items():
        found = rng.choice(swarm).get(key)
        assert found is not None and found.value == value and found.expiration_time == now + 60
    assert swarm[0].get("never-stored") is None


def test_subkeys_from_several_peers_merge(swarm):
    now = hivemind.get_dht_time()
    for i, dht in enumerate(swarm[:6]):
        assert dht.store("run.peers", {"step": i}, now + 30 + i, subkey=str(dht.peer_id))
    found = swarm[-1].get("run.peers", latest=True)
    assert {k: v.value for k, v in found.value.items()} == {
        str(d.peer_id): {"step": i} for i, d in enumerate(swarm[:6])
    }
    assert found.expiration_time == now + 35


def test_latest_returns_the_newest_value_and_older_stores_are_refused(swarm):
    now = hivemind.get_dht_time()
    assert swarm[1].store("model", "v1", now + 20)
    assert swarm[2].store("model", "v2", now + 40)
    assert not swarm[3].store("model", "stale", now + 30)  # every replica holds something newer
    assert swarm[4].get("model", latest=True).value == "v2"
    assert not swarm[5].store("model", "past", now - 1)


def test_values_expire(swarm):
    assert swarm[6].store("short-lived", 1, hivemind.get_dht_time() + 0.5)
    assert swarm[7].get("short-lived") is not None
    wait_for(lambda: swarm[7].get("short-lived", latest=True) is None, timeout=10, what="the value to expire")


def test_return_future_and_run_coroutine(swarm):
    future = swarm[0].store("f", 42, hivemind.get_dht_time() + 30, return_future=True)
    assert future.result(timeout=10) is True
    assert swarm[1].get("f", return_future=True).result(timeout=10).value == 42

    async def table_size(dht, node):
        return len(node.protocol.routing_table)

    assert swarm[0].run_coroutine(table_size) >= 5


def test_unserializable_value_is_a_clear_error(swarm):
    with pytest.raises(ConfigError, match="msgpack"):
        swarm[0].store("bad", object(), hivemind.get_dht_time() + 10)


def _holders(dhts, key):
    key_id = DHTID.from_key(key)

    async def holds(dht, node):
        return key_id in node.protocol.storage

    return [d for d in dhts if d.is_alive() and d.run_coroutine(holds)]


def test_data_survives_nodes_leaving_and_is_re_replicated():
    dhts = launch_swarm(14, seed=3, wait_timeout=0.5, refresh_period=0.3, blacklist_time=0.2)
    try:
        now = hivemind.get_dht_time()
        keys = [f"precious-{i}" for i in range(5)]
        for key in keys:
            assert dhts[0].store(key, key.upper(), now + 120)
        key = keys[0]
        holders = _holders(dhts, key)
        assert len(holders) == 5  # num_replicas
        for dht in holders[:3]:
            dht.shutdown()
        alive = [d for d in dhts if d.is_alive()]
        assert all(d.get(key, latest=True).value == key.upper() for d in alive)
        # survivors notice the departures and copy the record to new replicas
        wait_for(lambda: len(_holders(alive, key)) >= 5, timeout=20, what="re-replication to 5 live nodes")
        for dht in holders[3:]:
            dht.shutdown()  # every original holder is gone now
        alive = [d for d in dhts if d.is_alive()]
        for other in keys:
            assert alive[0].get(other, latest=True).value == other.upper()
    finally:
        shutdown_all(dhts)


def test_unreachable_bootstrap_peer_fails_clearly():
    ghost = Identity.generate().peer_id
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(BootstrapError) as info:
            hivemind.DHT(initial_peers=[f"/ip4/127.0.0.1/tcp/{port}/p2p/{ghost}"], start=True, wait_timeout=1)
    message = str(info.value)
    assert f"127.0.0.1/tcp/{port}" in message and "refused" in message and "\n" not in message


def test_bootstrap_to_the_wrong_peer_is_refused():
    with local_swarm(1) as (dht,):
        real = dht.get_visible_maddrs()[0]
        impostor_claim = f"/ip4/{real.host}/tcp/{real.port}/p2p/{Identity.generate().peer_id}"
        with pytest.raises(BootstrapError, match=r"not .* as the address says"):
            hivemind.DHT(initial_peers=[impostor_claim], start=True, wait_timeout=1)


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("/ip4/1.2.3/tcp/5/p2p/12D3KooWRoyZFYNZAojF2JvzR4d4pb14J78wvaMFL8cP78YXWz7V", "'1.2.3' is not an IPv4"),
        ("/ip4/127.0.0.1/tcp/31337", "no /p2p/PEER_ID"),
        ("/ip4/127.0.0.1/udp/5/p2p/x", "transport 'udp'"),
        ("", "empty"),
    ],
)
def test_bad_initial_peer_address(address, fragment):
    with pytest.raises(MultiaddrError, match=fragment):
        hivemind.DHT(initial_peers=[address])


def test_unknown_setting_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'num_replicas'"):
        hivemind.DHT(num_replica=3)


def test_visible_maddrs_default_to_loopback_and_announce_overrides():
    with hivemind.DHT(start=True) as dht:
        (maddr,) = dht.get_visible_maddrs()
        assert str(maddr).startswith("/ip4/127.0.0.1/tcp/") and str(maddr).endswith(f"/p2p/{dht.peer_id}")
    with hivemind.DHT(start=True, announce_maddrs=["/ip4/203.0.113.7/tcp/4242"]) as dht:
        assert [str(m) for m in dht.get_visible_maddrs()] == [f"/ip4/203.0.113.7/tcp/4242/p2p/{dht.peer_id}"]


def test_identity_path_keeps_the_peer_id(tmp_path):
    path = tmp_path / "peer.key"
    first = hivemind.DHT(identity_path=str(path)).peer_id
    assert hivemind.DHT(identity_path=str(path)).peer_id == first


def test_client_mode_uses_the_dht_but_is_not_routed_to(swarm):
    address = [str(swarm[0].get_visible_maddrs()[0])]
    with hivemind.DHT(initial_peers=address, client_mode=True, start=True, **FAST) as client:
        now = hivemind.get_dht_time()
        assert client.store("from-client", "hello", now + 30)
        assert swarm[5].get("from-client").value == "hello"
        assert client.get("key-0") is not None

        async def knows_client(dht, node):
            return client.peer_id in node.protocol.routing_table.peer_to_node

        assert not any(d.run_coroutine(knows_client) for d in swarm)


def test_garbage_and_oversized_frames_do_not_stop_the_node(swarm):
    target = swarm[0].get_visible_maddrs()[0]
    for junk in (b"GET / HTTP/1.1\r\n\r\n", struct.pack(">II", 2**31, 0), b"\xff" * 64):
        with socket.create_connection((target.host, target.port), timeout=5) as s:
            s.sendall(junk)
            s.settimeout(5)
            try:
                while s.recv(4096):  # the node answers with its handshake, then hangs up on us
                    pass
            except ConnectionResetError:
                pass
    now = hivemind.get_dht_time()
    assert swarm[1].store("after-junk", 1, now + 30)
    assert swarm[0].get("after-junk", latest=True).value == 1


def test_many_nodes_over_the_memory_transport():
    network = MemoryTransport.Network()
    dhts = launch_swarm(30, seed=4, transport=MemoryTransport(network), **FAST)
    try:
        now = hivemind.get_dht_time()
        for i in range(20):
            assert dhts[i].store(("mem", i), i, now + 30)
        assert all(dhts[-1 - i].get(("mem", i)).value == i for i in range(20))
    finally:
        shutdown_all(dhts)


def test_blacklist_backs_off_exponentially_and_forgives_on_success(monkeypatch):
    from hivecli.dht import protocol

    now = {"t": 100.0}
    monkeypatch.setattr(protocol.time, "monotonic", lambda: now["t"])
    blacklist = protocol.Blacklist(base_time=5, backoff_rate=2, max_time=300)
    peer = Identity.generate().peer_id
    bans = []
    for _ in range(8):
        blacklist.register_failure(peer)
        start = now["t"]
        while blacklist.is_banned(peer):
            now["t"] += 1
        bans.append(now["t"] - start)
    assert bans == [5, 10, 20, 40, 80, 160, 300, 300]
    blacklist.register_failure(peer)
    blacklist.register_success(peer)
    assert not blacklist.is_banned(peer)


def _memory_nodes():
    """A factory of DHT nodes on one in-memory network: `await node(*initial_peers)`."""
    network = MemoryTransport.Network()
    loopback = [hivemind.Multiaddr.parse("/ip4/127.0.0.1/tcp/0")]

    async def node(*initial):
        host = Host(transport=MemoryTransport(network))
        return await DHTNode.create(
            host, initial_peers=list(initial), host_maddrs=loopback, settings=DHTSettings(wait_timeout=1.0)
        )

    return node


def test_get_caches_the_value_on_the_lookup_path():
    """Reader R knows only B; B lacks the key but points to holder A. After R's get, both R and
    B hold a cached copy (B is the nearest node on the path that lacked it)."""

    async def scenario():
        node = _memory_nodes()
        a = await node()
        b = await node(a.host.visible_maddrs()[0])
        reader = await node()
        try:
            key_id = DHTID.from_key("popular")
            a.protocol.storage.store(key_id, b"\xa3hot", hivemind.get_dht_time() + 60)
            reader.protocol._saw_node(b.node_id, b.peer_id)
            reader.host.add_addrs(b.peer_id, b.host.visible_maddrs())
            found = await reader.get("popular")
            assert found.value == "hot"
            assert key_id in reader.protocol.cache
            await asyncio.wait_for(_until(lambda: key_id in b.protocol.cache), timeout=10)
            assert key_id not in b.protocol.storage  # a cached copy, not a replica
        finally:
            for n in (reader, b, a):
                await n.shutdown()

    asyncio.run(scenario())


def test_stores_of_a_key_reuse_its_nearest_nodes_until_one_of_them_fails():
    """Matchmaking stores its declaration every round: a lookup's nearest nodes serve later
    stores of the same key without a new lookup (a round trip less), until one of them leaves
    the routing table, as a node that failed does."""

    async def scenario():
        node = _memory_nodes()
        a = await node()
        b = await node(a.host.visible_maddrs()[0])
        writer = await node(a.host.visible_maddrs()[0])
        finds = []
        call_find = writer.protocol.call_find

        async def counted(peer, key_ids):
            finds.append(peer)
            return await call_find(peer, key_ids)

        writer.protocol.call_find = counted
        try:
            now = hivemind.get_dht_time()
            assert await writer.store("declared", 1, now + 60)
            looked_up = len(finds)
            assert looked_up > 0
            key_id = DHTID.from_key("declared")
            found_at, nearest = writer._recent_nearest[key_id]
            writer._recent_nearest[key_id] = (found_at - 10, nearest)  # a round later
            assert await writer.store("declared", 2, now + 61)
            assert len(finds) == looked_up  # the same nearest nodes, no lookup
            for other in (a, b):
                assert other.protocol.storage.get(key_id).expiration_time == now + 61
            writer.protocol.routing_table.remove(a.node_id)  # as when a stops answering
            assert await writer.store("declared", 3, now + 62)
            assert len(finds) > looked_up
        finally:
            for n in (writer, b, a):
                await n.shutdown()

    asyncio.run(scenario())


async def _until(condition):
    while not condition():
        await asyncio.sleep(0.01)


def test_listening_on_every_interface_lists_each_interface_address():
    from hivecli.net.interfaces import interface_addresses

    with hivemind.DHT(start=True, host_maddrs=["/ip4/0.0.0.0/tcp/0"]) as dht:
        # what anyone may be told (the printed join line, the DHT): never loopback
        everyone = [m.host for m in dht.get_visible_maddrs()]
        assert "0.0.0.0" not in everyone and "127.0.0.1" not in everyone
        assert set(everyone) == set(interface_addresses(socket.AF_INET)) - {"127.0.0.1"}
        # a peer on this very machine is also told the loopback address, last
        maddrs = dht.node.host.visible_maddrs("127.0.0.1")
        hosts = [m.host for m in maddrs]
        assert set(hosts) == set(interface_addresses(socket.AF_INET))
        assert hosts[-1] == "127.0.0.1"  # loopback last: the others are what remote peers can use
        assert len({m.port for m in maddrs}) == 1
        with hivemind.DHT(initial_peers=[str(maddrs[-1])], start=True) as joiner:
            assert joiner.store("via-any-interface", 1, hivemind.get_dht_time() + 30)
