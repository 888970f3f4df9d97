"""Records a DHT node holds: values with absolute expiration times, optionally split by subkey.

Rules (the same on every node, so replicas converge):
- a store whose expiration time has already passed is refused;
- a regular value replaces what is stored only if its expiration is strictly later than the
  stored record's (for a dictionary: later than its latest subkey);
- a subkey store is refused while a regular value with a later or equal expiration is stored,
  and otherwise replaces only its own subkey, under the same "strictly later" rule;
- expired records and subkeys disappear on their own (checked lazily on access).
Values and subkeys are opaque bytes here (msgpack produced by the storing client).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import NamedTuple

from hivecli.dht.routing import DHTID
from hivecli.utils.timing import get_dht_time


class ValueWithExpiration(NamedTuple):
    """A value and the DHT time after which it no longer exists."""

    value: object
    expiration_time: float


class Record(NamedTuple):
    """What a node holds under one key: a regular value (`subkeys` is None) or a dictionary."""

    value: bytes | None
    expiration_time: float
    subkeys: dict[bytes, tuple[bytes, float]] | None = None


class LocalStorage:
    """The key -> record map of one node, with lazy expiration and an optional size bound."""

    def __init__(self, max_records: int | None = None):
        self.max_records = max_records
        self._records: dict[DHTID, Record] = {}
        self._expirations: list[tuple[float, DHTID]] = []  # heap; may hold stale entries

    def store(self, key_id: DHTID, value: bytes, expiration_time: float, subkey: bytes | None = None) -> bool:
        """Apply one store under the rules in the module docstring. Returns whether it took effect."""
        now = get_dht_time()
        if expiration_time <= now:
            return False
        current = self.get(key_id)
        if subkey is None:
            if current is not None and current.expiration_time >= expiration_time:
                return False
            self._put(key_id, Record(value, expiration_time))
            return True
        if current is not None and current.subkeys is None:
            if current.expiration_time >= expiration_time:
                return False
            current = None  # an older regular value gives way to the dictionary
        subkeys = dict(current.subkeys) if current is not None and current.subkeys is not None else {}
        old = subkeys.get(subkey)
        if old is not None and old[1] >= expiration_time:
            return False
        subkeys[subkey] = (value, expiration_time)
        self._put(key_id, Record(None, max(exp for _, exp in subkeys.values()), subkeys))
        return True

    def get(self, key_id: DHTID) -> Record | None:
        """The live record under `key_id` (expired subkeys removed), or None."""
        record = self._records.get(key_id)
        if record is None:
            return None
        now = get_dht_time()
        if record.expiration_time <= now:
            del self._records[key_id]
            return None
        if record.subkeys is not None and any(exp <= now for _, exp in record.subkeys.values()):
            live = {sub: item for sub, item in record.subkeys.items() if item[1] > now}
            record = Record(None, max(exp for _, exp in live.values()), live)
            self._records[key_id] = record
        return record

    def _put(self, key_id: DHTID, record: Record) -> None:
        self._records[key_id] = record
        heapq.heappush(self._expirations, (record.expiration_time, key_id))
        self._evict()

    def _evict(self) -> None:
        now = get_dht_time()
        while self._expirations and (
            self._expirations[0][0] <= now or (self.max_records is not None and len(self._records) > self.max_records)
        ):
            expiration, key_id = heapq.heappop(self._expirations)
            record = self._records.get(key_id)
            if record is not None and record.expiration_time == expiration:
                del self._records[key_id]  # expired, or the soonest to expire when over capacity
        if len(self._expirations) > 4 * len(self._records) + 64:  # drop stale heap entries
            self._expirations = [(r.expiration_time, k) for k, r in self._records.items()]
            heapq.heapify(self._expirations)

    def keys(self) -> list[DHTID]:
        self._evict()
        return list(self._records)

    def items(self) -> Iterator[tuple[DHTID, Record]]:
        for key_id in self.keys():
            record = self.get(key_id)
            if record is not None:
                yield key_id, record

    def __len__(self) -> int:
        self._evict()
        return len(self._records)

    def __contains__(self, key_id: object) -> bool:
        return isinstance(key_id, DHTID) and self.get(key_id) is not None


def merge_records(a: Record | None, b: Record | None) -> Record | None:
    """Combine two views of one key as a node would after receiving both: newest wins, per subkey."""
    if a is None or b is None:
        return a or b
    if a.subkeys is None or b.subkeys is None:
        if a.subkeys is None and b.subkeys is None:
            return a if a.expiration_time >= b.expiration_time else b
        regular, dictionary = (a, b) if a.subkeys is None else (b, a)
        return regular if regular.expiration_time >= dictionary.expiration_time else dictionary
    merged = dict(a.subkeys)
    for subkey, item in b.subkeys.items():
        if subkey not in merged or merged[subkey][1] < item[1]:
            merged[subkey] = item
    return Record(None, max(exp for _, exp in merged.values()), merged)
