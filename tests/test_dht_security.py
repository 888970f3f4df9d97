"""The DHT against hostile peers, through the wire as they would attack it: real nodes on
127.0.0.1, and attackers with identities of their own sending raw dht.* requests."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import hivecli as hivemind
from hivecli import ConfigError
from hivecli._exceptions import RPCError
from hivecli.dht import DHTNode, DHTSettings
from hivecli.dht.protocol import Blacklist, FindResult
from hivecli.dht.records import (
    Record,
    SubkeyEntry,
    encode_record,
    owned_subkey,
    packed_subkey_owner,
    sign_entry,
    subkey_owner,
)
from hivecli.dht.routing import DHTID
from hivecli.dht.storage import LocalStorage, merge_records
from hivecli.net import Host, Identity
from hivecli.net.framing import pack, unpack
from hivecli.net.multiaddr import Multiaddr
from hivecli.utils.timing import get_dht_time

LOOPBACK = [Multiaddr.parse("/ip4/127.0.0.1/tcp/0")]
KIB = 1024


def run(scenario: Callable[[], Awaitable[None]], timeout: float = 120) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout))


async def start_nodes(n: int, **overrides: Any) -> list[DHTNode]:
    """n honest nodes on loopback, each joining through the first."""
    settings = DHTSettings(**{"wait_timeout": 2.0, **overrides})
    nodes: list[DHTNode] = []
    for _ in range(n):
        initial = nodes[0].host.visible_maddrs()[:1] if nodes else []
        nodes.append(await DHTNode.create(Host(), initial_peers=initial, host_maddrs=LOOPBACK, settings=settings))
    return nodes


async def stop(*things: DHTNode | Host) -> None:
    for thing in things:
        await (thing.shutdown() if isinstance(thing, DHTNode) else thing.aclose())


async def until(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.01)


async def raw(attacker: Host, target: DHTNode, method: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A hand-made request from `attacker` (a client unless payload names a node ID)."""
    payload.setdefault("node", None)
    return (await attacker.call(target.host.visible_maddrs()[0], method, payload, timeout=10)).payload


async def raw_store(attacker: Host, target: DHTNode, items: list[list[Any]]) -> list[bool]:
    return (await raw(attacker, target, "dht.store", {"items": items}))["ok"]


def held(node: DHTNode, key_id: DHTID) -> Record | None:
    return merge_records(node.protocol.storage.get(key_id), node.protocol.cache.get(key_id))


# ---- owned subkeys ----------------------------------------------------------------------------


def test_owned_subkey_markers():
    peer = Identity.generate().peer_id
    assert owned_subkey(peer) == f"[owner:{peer}]"
    assert subkey_owner(owned_subkey(peer, "step")) == peer
    assert packed_subkey_owner(pack(owned_subkey(peer, "x"))) == peer
    assert subkey_owner("plain") is None and subkey_owner(7) is None
    for bad in ("[owner:nonsense]", "[owner:", f"[owner:{peer}][owner:{Identity.generate().peer_id}]"):
        with pytest.raises(ValueError):
            subkey_owner(bad)


def test_a_signature_is_verified_once_however_many_replicas_send_it(monkeypatch):
    from hivecli.dht import records

    me, key = Identity.generate(), DHTID.from_key("k").to_bytes_()
    sub = pack(owned_subkey(me.peer_id))
    signature = sign_entry(me, key, sub, b"v", 1e9)
    checks = []
    real_verify = type(me.peer_id).verify
    monkeypatch.setattr(type(me.peer_id), "verify", lambda self, *a: checks.append(1) or real_verify(self, *a))
    assert all(records.verify_entry(me.peer_id, signature, key, sub, b"v", 1e9) for _ in range(5))
    assert not records.verify_entry(me.peer_id, signature, key, sub, b"other", 1e9)
    assert len(checks) == 2


def test_forging_another_peers_subkey_is_refused_on_every_replica():
    async def scenario() -> None:
        nodes = await start_nodes(5)
        attacker = Host()
        try:
            owner = nodes[1]
            sub = owned_subkey(owner.peer_id, "progress")
            now = get_dht_time()
            assert await owner.store("run.progress", {"step": 1}, now + 60, subkey=sub)
            key_id = DHTID.from_key("run.progress")
            kb, sb, forged = key_id.to_bytes_(), pack(sub), pack({"step": 999})
            assert all(key_id in node.protocol.storage for node in nodes)  # 5 replicas: everyone
            real = sign_entry(owner.host.identity, kb, sb, pack({"step": 1}), now + 60)
            attempts = [
                [kb, sb, forged, now + 120, False],  # unsigned
                [kb, sb, forged, now + 120, False, sign_entry(Identity.generate(), kb, sb, forged, now + 120)],
                [kb, sb, forged, now + 60.5, False, real],  # the owner's signature on another value
                [kb, sb, pack({"step": 1}), now + 120, False, real],  # ... and on another expiration
                [kb, sb, forged, now + 120, True, b"\0" * 64],  # into the cache
                [kb, sb, forged, now + 120, False, b"short"],
            ]
            for node in nodes:
                assert await raw_store(attacker, node, attempts) == [False] * len(attempts)
            for node in nodes:
                assert unpack(held(node, key_id).subkeys[sb].value) == {"step": 1}
            with pytest.raises(ConfigError, match="cannot sign"):
                await nodes[2].store("run.progress", {"step": 5}, now + 90, subkey=sub)
            assert await owner.store("run.progress", {"step": 2}, now + 90, subkey=sub)
            found = await nodes[3].get("run.progress", latest=True)
            assert found.value[sub].value == {"step": 2}
        finally:
            await stop(attacker, *nodes)

    run(scenario)


def test_shadowing_a_dictionary_fails_and_owners_keep_writing():
    async def scenario() -> None:
        nodes = await start_nodes(5)
        attacker = Host()
        try:
            key, now = "demo.0b", get_dht_time()
            subs = {node.peer_id: owned_subkey(node.peer_id) for node in nodes[:3]}
            for node in nodes[:3]:
                assert await node.store(key, ["addr-1"], now + 30, subkey=subs[node.peer_id])
            kb = DHTID.from_key(key).to_bytes_()
            shadow = [[kb, None, pack("gotcha"), math.inf, False], [kb, None, pack("gotcha"), 1e300, True]]
            for node in nodes:
                assert await raw_store(attacker, node, shadow) == [False, False]
            for node in nodes[:3]:
                assert await node.store(key, ["addr-2"], now + 60, subkey=subs[node.peer_id])
            found = await nodes[4].get(key, latest=True)
            assert {sub: v.value for sub, v in found.value.items()} == {sub: ["addr-2"] for sub in subs.values()}
        finally:
            await stop(attacker, *nodes)

    run(scenario)


def test_a_squatter_is_overridden_by_the_owner():
    async def scenario() -> None:
        nodes = await start_nodes(5)
        attacker = Host()
        try:
            key, now = "demo.all_averagers", get_dht_time()
            key_id = DHTID.from_key(key)
            squat = [[key_id.to_bytes_(), None, pack("mine forever"), math.inf, False]]
            for node in nodes:
                assert await raw_store(attacker, node, squat) == [True]
                # an unsigned expiration is capped to max_expiration (24 h)
                assert node.protocol.storage.get(key_id).expiration_time <= get_dht_time() + 24 * 3600
            owner = nodes[2]
            sub = owned_subkey(owner.peer_id)
            assert await owner.store(key, "state", now + 30, subkey=sub)
            found = await nodes[0].get(key, latest=True)
            assert {s: v.value for s, v in found.value.items()} == {sub: "state"}
            for node in nodes:
                assert node.protocol.storage.get(key_id).subkeys is not None
        finally:
            await stop(attacker, *nodes)

    run(scenario)


def test_a_forged_record_from_a_malicious_holder_is_dropped_by_the_reader():
    async def scenario() -> None:
        (holder,) = await start_nodes(1)
        liar, liar_id = Host(), DHTID.generate()
        await liar.listen(LOOPBACK)
        readers = [*await start_nodes(1), *await start_nodes(1)]  # each knows nobody yet
        try:
            sub = owned_subkey(holder.peer_id, "p")
            now = get_dht_time()
            assert await holder.store("k", 1, now + 60, subkey=sub)
            forged = Record(None, now + 120, {pack(sub): SubkeyEntry(pack(666), now + 120, b"\1" * 64)})

            def fake_find(conn: Any, payload: Any, body: bytes) -> dict[str, Any]:
                return {"node": liar_id.to_bytes_(), "results": [[encode_record(forged), []] for _ in payload["keys"]]}

            liar.add_inline_handler("dht.find", fake_find)
            both, only_liar = readers
            for reader, peers in ((both, [holder, liar]), (only_liar, [liar])):
                for peer in peers:
                    peer_host = peer if isinstance(peer, Host) else peer.host
                    reader.host.add_addrs(peer_host.peer_id, peer_host.visible_maddrs())
                    reader.protocol._saw_node(liar_id if peer is liar else peer.node_id, peer_host.peer_id)
            found = await both.get("k", latest=True)
            assert {s: v.value for s, v in found.value.items()} == {sub: 1}
            assert await only_liar.get("k", latest=True) is None
            for reader in readers:  # a peer that returns forged entries counts as failed
                assert reader.protocol.blacklist.is_banned(liar.peer_id)
                assert liar_id not in reader.protocol.routing_table
        finally:
            await stop(*readers, liar, holder)

    run(scenario)


def test_undecodable_subkeys_do_not_hide_the_others():
    async def scenario() -> None:
        (node,) = await start_nodes(1)
        attacker = Host()
        try:
            sub, exp = owned_subkey(node.peer_id), get_dht_time() + 60
            assert await node.store("mixed", "good", exp, subkey=sub)
            kb = DHTID.from_key("mixed").to_bytes_()
            junk = [[kb, pack([1, 2]), pack("list key"), exp, False], [kb, b"\xc1", pack("bad"), exp, False]]
            assert await raw_store(attacker, node, junk) == [True, True]
            found = await node.get("mixed", latest=True)
            assert {s: v.value for s, v in found.value.items()} == {sub: "good"}
        finally:
            await stop(attacker, node)

    run(scenario)


# ---- storage rules, one node's view ---------------------------------------------------------------


@pytest.fixture
def clock(monkeypatch):
    from hivecli.dht import storage as storage_module

    now = {"t": 1000.0}
    monkeypatch.setattr(storage_module, "get_dht_time", lambda: now["t"])
    return now


def _signed(identity: Identity, key_id: DHTID, name: str, value: bytes, exp: float) -> tuple[bytes, bytes]:
    sub = pack(owned_subkey(identity.peer_id, name))
    return sub, sign_entry(identity, key_id.to_bytes_(), sub, value, exp)


def test_storage_rules_for_owned_subkeys(clock):
    s, me, key = LocalStorage(max_expiration=3600), Identity.generate(), DHTID.from_key("k")
    assert s.store(key, b"squat", math.inf) and s.get(key).expiration_time == 1000 + 3600  # capped
    sub, sig = _signed(me, key, "a", b"v", 1100)
    assert s.store(key, b"v", 1100, sub, sig)  # takes the key over, though the squat expires later
    assert not s.store(key, b"shadow", 4000) and not s.store(key, b"shadow", 4000, payer=me.peer_id)
    assert not s.store(key, b"v2", 1200, sub)  # unsigned
    far_sub, far_sig = _signed(me, key, "far", b"w", 1000 + 3600 + 120)
    assert not s.store(key, b"w", 1000 + 3600 + 120, far_sub, far_sig)  # signed beyond max_expiration
    assert s.store(key, b"x", 1100, b"plain", b"\0" * 64)
    assert s.get(key).subkeys[b"plain"].signature is None  # a signature on an unowned entry means nothing
    assert s.get(key).subkeys[sub].signature == sig


def test_per_peer_quota_and_capacity(clock):
    s = LocalStorage(max_records=100, max_bytes=10**6, peer_quota=0.1)
    hog, other = Identity.generate().peer_id, Identity.generate().peer_id
    assert sum(s.store(DHTID.from_key(i), b"x", 2000, payer=hog) for i in range(20)) == 10
    assert s.store(DHTID.from_key("other"), b"x", 2000, payer=other)
    assert s.peer_usage(hog)[0] == 10
    assert s.store(DHTID.from_key(3), b"newer", 2100, payer=hog)  # replacing its own record is fine
    for i in range(200):
        s.store(DHTID.from_key(("mine", i)), b"x", 1500 + i)
    assert len(s) == 100 and DHTID.from_key(("mine", 0)) not in s  # the soonest to expire went first
    assert s.peer_usage(hog)[0] == 10  # accounting follows evictions


def test_a_full_record_admits_owned_subkeys_by_pushing_out_unowned_ones(clock):
    s, me, key = LocalStorage(max_record_bytes=4096), Identity.generate(), DHTID.from_key("k")
    assert [s.store(key, b"u" * 1000, 1100 + i, pack(i)) for i in range(4)] == [True] * 3 + [False]
    sub, sig = _signed(me, key, "", b"o" * 1000, 1050)
    assert s.store(key, b"o" * 1000, 1050, sub, sig)
    assert set(s.get(key).subkeys) == {pack(1), pack(2), sub}  # the soonest-to-expire unowned one left
    assert s.get(key).expiration_time == 1102 and s.nbytes <= 4096


def test_subkey_stores_change_the_record_in_place(clock):
    s, key = LocalStorage(), DHTID.from_key("k")
    assert s.store(key, b"v", 2000, b"first")
    subkeys = s._slots[key].subkeys
    for i in range(10_000):
        assert s.store(key, b"v", 2000 + i % 7, pack(i))
    assert s._slots[key].subkeys is subkeys and len(s.get(key).subkeys) == 10_001
    clock["t"] = 2003.5  # lazy expiration drops what expired, and only that
    assert len(s.get(key).subkeys) == sum(1 for i in range(10_000) if 2000 + i % 7 > 2003.5)


# ---- bounds -----------------------------------------------------------------------------------


def test_ten_thousand_subkeys_cost_linear_time():
    async def scenario() -> None:
        nodes = await start_nodes(3, peer_quota=1.0)
        attacker = Host()
        try:
            reader = nodes[2]

            async def flood_and_read(n: int) -> float:
                key = f"flood-{n}"
                kb, exp = DHTID.from_key(key).to_bytes_(), get_dht_time() + 120
                items = [[kb, pack(f"fake-{i}"), pack(i), exp, False] for i in range(n)]
                began = time.perf_counter()
                for start in range(0, n, 1024):
                    for node in nodes[:2]:
                        assert all(await raw_store(attacker, node, items[start : start + 1024]))
                found = await reader.get(key, latest=True)
                elapsed = time.perf_counter() - began
                assert len(found.value) == n
                return elapsed

            small = await flood_and_read(1000)
            large = await flood_and_read(10_000)
            # linear work is ~10x; the old copy-per-store path was ~100x (14.6 s for one get)
            assert large < 40 * small, (small, large)
        finally:
            await stop(attacker, *nodes)

    run(scenario)


def test_oversized_values_and_records_are_refused():
    async def scenario() -> None:
        (target,) = await start_nodes(1)
        attacker = Host()
        try:
            kb, exp = DHTID.from_key("big").to_bytes_(), get_dht_time() + 60
            assert await raw_store(attacker, target, [[kb, None, b"x" * (256 * KIB + 1), exp, False]]) == [False]
            assert await raw_store(attacker, target, [[kb, None, b"x" * (200 * KIB), exp, False]]) == [True]
            # a record holds at most max_record_bytes (1 MiB) over all its subkeys
            kb = DHTID.from_key("fat").to_bytes_()
            results = [
                await raw_store(attacker, target, [[kb, pack(i), b"y" * (200 * KIB), exp, False]]) for i in range(6)
            ]
            assert results == [[True]] * 5 + [[False]]
            with pytest.raises(ConfigError, match="at most"):
                await target.store("too-big", "z" * (300 * KIB), exp)
        finally:
            await stop(attacker, target)

    run(scenario)


def test_find_replies_are_deduplicated_and_within_budget():
    async def scenario() -> None:
        target, reader = await start_nodes(2)
        attacker = Host()
        try:
            exp = get_dht_time() + 60
            key_ids = [DHTID.from_key(("heavy", i)) for i in range(6)]
            for key_id in key_ids:  # six records of ~900 KiB: one reply holds two at most
                items = [[key_id.to_bytes_(), pack(j), b"v" * (225 * KIB), exp, False] for j in range(4)]
                assert await raw_store(attacker, target, items) == [True] * 4
            budget = target.settings.max_reply_bytes
            reply = await raw(attacker, target, "dht.find", {"keys": [key_ids[0].to_bytes_()] * 1024})
            assert len(reply["results"]) == 1024 and reply["results"][0][0] is not None
            assert all(record is None for record, _ in reply["results"][1:])
            assert len(pack(reply)) < budget + 64 * KIB
            reply = await raw(attacker, target, "dht.find", {"keys": [k.to_bytes_() for k in key_ids]})
            assert len(pack(reply)) < budget + 64 * KIB and reply["omitted"]
            # the reader asks again for what was left out, and gets every record
            found = await reader.protocol.call_find(target.peer_id, key_ids)
            assert found is not None and all(len(r.record.subkeys) == 4 for r in found)
        finally:
            await stop(attacker, reader, target)

    run(scenario)


def test_fresh_node_ids_cause_bounded_handover():
    async def scenario() -> None:
        rate = 1000.0
        (target,) = await start_nodes(1, handover_rate=rate)
        n_keys, now = 2000, get_dht_time()
        for i in range(n_keys):
            assert target.protocol.storage.store(DHTID.from_key(("k", i)), pack(i), now + 300)
        scans = []
        real_scan = target._scan

        async def counting_scan(*args: Any) -> Any:
            scans.append(time.monotonic())
            return await real_scan(*args)

        target._scan = counting_scan  # type: ignore[method-assign]
        received: list[tuple[float, int]] = []  # (when, items) of every store request hostile peers got

        async def hostile() -> Host:
            host = Host()
            await host.listen(LOOPBACK)

            def on_store(conn: Any, payload: Any, body: bytes) -> dict[str, Any]:
                received.append((time.monotonic(), len(payload["items"])))
                return {"node": None, "ok": [True] * len(payload["items"])}

            host.add_inline_handler("dht.store", on_store)
            return host

        attackers = [await hostile()]
        try:
            for _ in range(300):  # one peer, a fresh node ID each time
                await raw(attackers[0], target, "dht.ping", {"node": DHTID.generate().to_bytes_()})
            assert len(target.protocol.routing_table) == 1 and not target._newcomers
            await until(lambda: sum(n for _, n in received) >= n_keys, what="the one handover")
            assert sum(n for _, n in received) == n_keys and len(received) <= math.ceil(n_keys / 256)

            # many identities at once: batched into few scans, and sent at most `rate` items a second
            attackers += [await hostile() for _ in range(10)]
            received.clear()
            began = time.monotonic()
            for attacker in attackers[1:]:
                await raw(attacker, target, "dht.ping", {"node": DHTID.generate().to_bytes_()})
            while time.monotonic() - began < 3:
                await asyncio.sleep(0.05)
                for when, _ in received:
                    so_far = sum(n for w, n in received if w <= when)
                    assert so_far <= rate * (when - began) + 2 * 256, (so_far, when - began)
            assert len(scans) <= 1 + (time.monotonic() - scans[0]) / 1.0 + 1
            assert (await raw(attackers[0], target, "dht.ping", {}))["time"] > 0  # still answering
        finally:
            await stop(*attackers, target)

    run(scenario)


def test_blacklist_survives_ten_thousand_failures():
    for rate in (2.0, 1e10):
        blacklist = Blacklist(base_time=5, backoff_rate=rate, max_time=300)
        peer = Identity.generate().peer_id
        for _ in range(10_000):
            blacklist.register_failure(peer)
        assert blacklist.is_banned(peer) and len(blacklist) == 1
        until_ts, _ = blacklist._banned[peer]
        assert until_ts - time.monotonic() <= 300


# ---- fuzzing a live node ------------------------------------------------------------------------

FUZZ_LIMITS = {
    "max_records": 64,
    "max_bytes": 256 * KIB,
    "max_value_bytes": 8 * KIB,
    "max_record_bytes": 32 * KIB,
    "max_reply_bytes": 64 * KIB,
}

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.binary(max_size=40),
    st.text(max_size=20),
)
_junk = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
_known_keys = [DHTID.from_key(i).to_bytes_() for i in range(4)]
_key = st.one_of(
    st.binary(min_size=20, max_size=20), st.sampled_from([DHTID.from_key(i).to_bytes_() for i in range(4)]), _junk
)
_peer = Identity.generate()
_subkey = st.one_of(
    st.none(),
    st.binary(max_size=30),
    st.just(pack(owned_subkey(_peer.peer_id, "fuzz"))),
    st.builds(lambda t: pack(f"[owner:{t}]"), st.text(max_size=60)),
    _junk,
)
_expiration = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(-10, 1e6).map(lambda d: get_dht_time() + d),
    _junk,
)
_value = st.one_of(st.binary(max_size=64), st.integers(0, 12 * KIB).map(lambda n: b"v" * n), _junk)
_signature = st.one_of(st.none(), st.binary(min_size=64, max_size=64), _junk)
_item = st.one_of(
    st.tuples(_key, _subkey, _value, _expiration, st.booleans()).map(list),
    st.tuples(_key, _subkey, _value, _expiration, st.booleans(), _signature).map(list),
    _junk,
)
_good_item = st.tuples(  # well-formed items, so that stores land and the bounds are tested
    st.one_of(st.binary(min_size=20, max_size=20), st.sampled_from(_known_keys)),
    st.one_of(st.none(), st.binary(max_size=30)),
    st.integers(0, 12 * KIB).map(lambda n: b"v" * n),
    st.floats(1, 1e6).map(lambda d: get_dht_time() + d),
    st.booleans(),
).map(list)
_node_field = st.one_of(st.none(), st.binary(min_size=20, max_size=20), _junk)
_requests = st.one_of(
    st.tuples(st.just("dht.store"), st.fixed_dictionaries({"node": _node_field, "items": st.lists(_item, max_size=8)})),
    st.tuples(st.just("dht.store"), st.fixed_dictionaries({"items": st.lists(_good_item, min_size=1, max_size=8)})),
    st.tuples(st.just("dht.find"), st.fixed_dictionaries({"node": _node_field, "keys": st.lists(_key, max_size=8)})),
    st.tuples(st.just("dht.ping"), st.fixed_dictionaries({"node": _node_field})),
    st.tuples(st.sampled_from(["dht.store", "dht.find", "dht.ping", "dht.peers"]), _junk),
)
_entry = st.one_of(
    st.tuples(_subkey, _value, _expiration).map(list),
    st.tuples(_subkey, _value, _expiration, _signature).map(list),
    _junk,
)
_record = st.one_of(
    st.none(),
    st.tuples(_expiration, _value).map(list),
    st.tuples(_expiration, st.none(), st.lists(_entry, max_size=4)).map(list),
    _junk,
)
_nearest = st.one_of(st.lists(st.tuples(_key, st.binary(max_size=40), _junk).map(list), max_size=3), _junk)
_find_replies = st.one_of(
    st.fixed_dictionaries(
        {"node": _node_field, "results": st.lists(st.tuples(_record, _nearest).map(list), min_size=1, max_size=1)},
        optional={"omitted": _junk},
    ),
    _junk,
)


@pytest.fixture(scope="module")
def fuzz_swarm():
    target = hivemind.DHT(start=True, wait_timeout=1.0, **FUZZ_LIMITS)
    attacker = hivemind.DHT(start=True, client_mode=True, wait_timeout=1.0)
    liar = hivemind.DHT(start=True, wait_timeout=1.0)
    try:
        yield target, attacker, liar
    finally:
        for dht in (liar, attacker, target):
            dht.shutdown()


def _no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]


def test_fuzzed_requests_are_answered_or_refused_and_storage_stays_bounded(fuzz_swarm, caplog):
    target, attacker, _ = fuzz_swarm
    address = target.get_visible_maddrs()[0]

    outcomes: list[str] = []

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_requests)
    def fuzz(request: tuple[str, Any]) -> None:
        method, payload = request

        async def send(dht: Any, node: DHTNode) -> str:
            try:
                reply = await node.host.call(address, method, payload, timeout=10)
                stored = method == "dht.store" and any(reply.payload["ok"])
                return "stored" if stored else "answered"
            except RPCError:
                return "refused"

        outcomes.append(attacker.run_coroutine(send))

        async def sizes(dht: Any, node: DHTNode) -> list[tuple[int, int]]:
            return [(len(s), s.nbytes) for s in (node.protocol.storage, node.protocol.cache)]

        for count, nbytes in target.run_coroutine(sizes):
            assert count <= FUZZ_LIMITS["max_records"] and nbytes <= FUZZ_LIMITS["max_bytes"]

    with caplog.at_level(logging.WARNING):
        fuzz()
    _no_errors_logged(caplog)
    assert len(outcomes) >= 200 and {"stored", "answered", "refused"} <= set(outcomes), len(outcomes)
    assert target.store("still-up", 1, get_dht_time() + 30) and target.get("still-up").value == 1


def test_fuzzed_find_replies_never_break_the_reader(fuzz_swarm, caplog):
    target, _, liar = fuzz_swarm
    reply: dict[str, Any] = {}
    key_id = DHTID.from_key("asked")

    async def install(dht: Any, node: DHTNode) -> None:
        node.host.add_inline_handler("dht.find", lambda conn, payload, body: reply["value"])

    liar.run_coroutine(install)
    liar_peer, liar_addrs = liar.peer_id, liar.get_visible_maddrs()

    results: list[Any] = []

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_find_replies)
    @example({"node": None, "results": [[None, [{"": None, "0": None, "00": None}]]]})  # a peer id as text
    def fuzz(fake: Any) -> None:
        reply["value"] = fake

        async def ask(dht: Any, node: DHTNode) -> Any:
            node.host.add_addrs(liar_peer, liar_addrs)
            node.protocol.blacklist.register_success(liar_peer)
            return await node.protocol.call_find(liar_peer, [key_id])

        result = target.run_coroutine(ask)
        results.append(result)
        assert result is None or (len(result) == 1 and isinstance(result[0], FindResult))
        if result is not None and result[0].record is not None:
            assert result[0].record.expiration_time == result[0].record.expiration_time  # never NaN

    with caplog.at_level(logging.WARNING):
        fuzz()
    _no_errors_logged(caplog)
    assert len(results) >= 100
