import pytest

from hivecli.dht import storage as storage_module
from hivecli.dht.routing import DHTID
from hivecli.dht.storage import LocalStorage, Record, SubkeyEntry, merge_records


@pytest.fixture
def clock(monkeypatch):
    now = {"t": 1000.0}
    monkeypatch.setattr(storage_module, "get_dht_time", lambda: now["t"])
    return now


KEY = DHTID.from_key("k")


def test_newer_replaces_older_and_equal_or_older_are_refused(clock):
    s = LocalStorage()
    assert s.store(KEY, b"v1", 1100)
    assert not s.store(KEY, b"older", 1050)
    assert not s.store(KEY, b"same-time", 1100)
    assert s.get(KEY) == Record(b"v1", 1100)
    assert s.store(KEY, b"v2", 1200)
    assert s.get(KEY).value == b"v2"


def test_expired_store_is_refused_and_records_expire(clock):
    s = LocalStorage()
    assert not s.store(KEY, b"v", 999)
    assert s.store(KEY, b"v", 1010)
    clock["t"] = 1010.0
    assert s.get(KEY) is None and len(s) == 0


def test_subkeys_expire_separately(clock):
    s = LocalStorage()
    assert s.store(KEY, b"a", 1100, subkey=b"x")
    assert s.store(KEY, b"b", 1300, subkey=b"y")
    assert not s.store(KEY, b"a-old", 1050, subkey=b"x")
    record = s.get(KEY)
    assert record.subkeys == {b"x": SubkeyEntry(b"a", 1100), b"y": SubkeyEntry(b"b", 1300)}
    assert record.expiration_time == 1300
    clock["t"] = 1150.0
    assert s.get(KEY).subkeys == {b"y": SubkeyEntry(b"b", 1300)}


def test_regular_value_and_dictionary_rules(clock):
    s = LocalStorage()
    assert s.store(KEY, b"reg", 1200)
    assert not s.store(KEY, b"sub", 1200, subkey=b"x")  # blocked by a regular value as new
    assert s.store(KEY, b"sub", 1300, subkey=b"x")  # a newer subkey replaces it
    assert s.get(KEY).subkeys == {b"x": SubkeyEntry(b"sub", 1300)}
    assert not s.store(KEY, b"reg2", 1250)  # older than the dictionary's latest subkey
    assert s.store(KEY, b"reg3", 1400)
    assert s.get(KEY) == Record(b"reg3", 1400)


def test_max_records_evicts_the_soonest_to_expire(clock):
    s = LocalStorage(max_records=2)
    ids = [DHTID.from_key(i) for i in range(3)]
    s.store(ids[0], b"0", 1500)
    s.store(ids[1], b"1", 1100)
    s.store(ids[2], b"2", 1300)
    assert set(s.keys()) == {ids[0], ids[2]}


def test_merge_records_keeps_newest_per_subkey():
    a = Record(None, 20, {b"x": SubkeyEntry(b"a", 10), b"y": SubkeyEntry(b"a", 20)})
    b = Record(None, 30, {b"x": SubkeyEntry(b"b", 30)})
    merged = merge_records(a, b)
    assert merged.subkeys == {b"x": SubkeyEntry(b"b", 30), b"y": SubkeyEntry(b"a", 20)}
    assert merged.expiration_time == 30
    assert merge_records(Record(b"r", 40), merged) == Record(b"r", 40)
    assert merge_records(Record(b"r", 25), merged) == merged
    assert merge_records(None, a) == a
