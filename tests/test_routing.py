import random

from hivecli.dht.routing import DHTID, RoutingTable
from hivecli.net.identity import Identity, PeerID


def _peers(n):
    return [Identity.generate().peer_id for _ in range(n)]


def test_nearest_matches_brute_force_on_10k_ids():
    rng = random.Random(0)
    table = RoutingTable(DHTID(rng.getrandbits(160)), bucket_size=20, depth_modulo=5)
    for _ in range(10_000):
        table.add_or_update(DHTID(rng.getrandbits(160)), _fake_peer(rng))
    # hivemind observes 45-65 buckets for 10k ids at k=20, b=5; relaxed splitting must stay bounded
    assert 45 <= len(table.buckets) <= 65
    assert len(table) == sum(len(b.nodes) for b in table.buckets)
    for _ in range(20):
        query = DHTID(rng.getrandbits(160))
        expected = sorted(table.node_to_peer, key=lambda n: n ^ query)[:7]
        assert [n for n, _ in table.nearest(query, 7)] == expected


def _fake_peer(rng):
    # a structurally valid peer ID without paying for a key pair
    return PeerID(Identity.generate().peer_id.to_bytes()[:-32] + rng.randbytes(32))


def test_full_far_bucket_keeps_old_nodes_and_offers_the_stale_one_for_a_ping():
    own = DHTID(0)  # our own id sits in the lowest bucket; high ids form a far bucket
    table = RoutingTable(own, bucket_size=2, depth_modulo=100)
    far = [DHTID(2**159 + i) for i in range(3)]
    peers = _peers(3)
    assert table.add_or_update(far[0], peers[0]) is None
    assert table.add_or_update(far[1], peers[1]) is None
    stale = table.add_or_update(far[2], peers[2])
    assert stale == far[0]  # least recently seen
    assert far[2] not in table
    assert table.remove(far[0])  # it did not answer: the newcomer is promoted
    assert far[2] in table and far[0] not in table
    assert table.node_to_peer[far[2]] == peers[2]


def test_bucket_holding_own_id_splits_instead_of_refusing():
    own = DHTID(0)
    table = RoutingTable(own, bucket_size=2, depth_modulo=100)
    for i, peer in enumerate(_peers(6)):
        assert table.add_or_update(DHTID(1 + i), peer) is None or len(table) >= 2
    assert len(table.buckets) > 1
    assert len(table) >= 2


def test_own_id_is_never_added_and_a_restarted_peer_replaces_its_old_entry():
    own = DHTID.generate()
    table = RoutingTable(own)
    peer = Identity.generate().peer_id
    table.add_or_update(own, peer)
    assert len(table) == 0
    old, new = DHTID.generate(), DHTID.generate()
    table.add_or_update(old, peer)
    table.add_or_update(new, peer)
    assert old not in table and table.peer_to_node[peer] == new


def test_key_ids_are_stable_sha1_of_msgpack():
    assert DHTID.from_key("abc") == DHTID.from_key("abc")
    assert DHTID.from_key("abc") != DHTID.from_key(b"abc")
    raw = DHTID.from_key(("tuple", 1)).to_bytes_()
    assert len(raw) == 20 and DHTID.from_bytes_(raw) == DHTID.from_key(["tuple", 1])
