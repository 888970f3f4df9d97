"""Records a DHT node holds: values with absolute expiration times, optionally split by subkey.

Rules (the same on every node, so replicas converge):
- a store whose expiration time has already passed (or is not a number) is refused;
- expirations more than `max_expiration` in the future: an unsigned store is capped to it; a
  signed (owned) one is refused, since its signature covers the expiration;
- a value over `max_value_bytes` is refused;
- an owned subkey (see `hivecli.dht.records`) is stored only with a valid signature by its owner;
  signatures on unowned entries mean nothing and are dropped;
- a regular value replaces what is stored only if its expiration is strictly later than the
  stored record's (for a dictionary: later than its latest subkey), and never replaces a
  dictionary that holds an owned subkey (so nobody can shadow others' owned subkeys);
- an unowned subkey store is refused while a regular value with a later or equal expiration is
  stored; an owned (signed) subkey store replaces a regular value whatever its expiration (so
  nobody can squat a key before its owners write); otherwise a subkey store replaces only its
  own subkey, under the same "strictly later" rule;
- a record (all its subkeys together) holds at most `max_record_bytes`: when full, a new subkey
  is refused after dropping expired ones, except that an owned subkey may push out unowned
  ones, soonest to expire first;
- each peer may have at most a `peer_quota` share of the records and bytes stored on its behalf
  (owned entries are charged to their owner, others to the peer that sent them);
- over `max_records` keys or `max_bytes` in all, the records soonest to expire are evicted;
- expired records and subkeys disappear on their own (checked lazily on access).
Values and subkeys are opaque bytes here (msgpack produced by the storing client). Subkey stores
change the stored dictionary in place: storing n subkeys costs O(n log n), not O(n^2).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import NamedTuple

from hivecli.dht.records import Record, SubkeyEntry, entry_bytes, packed_subkey_owner, verify_entry
from hivecli.dht.routing import DHTID
from hivecli.net.identity import PeerID
from hivecli.utils.timing import get_dht_time

# Signed entries made right at max_expiration by a peer whose clock runs a little ahead are
# still accepted (unsigned ones are simply capped).
CLOCK_SLACK_S = 60.0

__all__ = ["CLOCK_SLACK_S", "LocalStorage", "Record", "SubkeyEntry", "ValueWithExpiration", "merge_records"]


class ValueWithExpiration(NamedTuple):
    """A value and the DHT time after which it no longer exists."""

    value: object
    expiration_time: float


class _Slot:
    """A record as stored: mutable, so that a subkey store does not copy the dictionary."""

    __slots__ = ("expiration_time", "heap", "nbytes", "owned", "payer", "payers", "subkeys", "value")

    def __init__(self, expiration_time: float, value: bytes | None = None, payer: PeerID | None = None):
        self.value = value
        self.expiration_time = expiration_time
        self.payer = payer  # for a regular value
        self.subkeys: dict[bytes, SubkeyEntry] | None = None if value is not None else {}
        self.payers: dict[bytes, PeerID] = {}  # subkey -> who is charged for it (if anyone)
        self.heap: list[tuple[float, bytes]] = []  # subkey expirations; may hold stale entries
        self.owned = 0  # how many subkeys carry a signature
        self.nbytes = 0


class LocalStorage:
    """The key -> record map of one node, with lazy expiration and the bounds in the module
    docstring (each None: unbounded)."""

    def __init__(
        self,
        max_records: int | None = None,
        *,
        max_bytes: int | None = None,
        max_record_bytes: int | None = None,
        max_value_bytes: int | None = None,
        max_expiration: float | None = None,
        peer_quota: float | None = None,
    ):
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.max_record_bytes = max_record_bytes
        self.max_value_bytes = max_value_bytes
        self.max_expiration = max_expiration
        quota = peer_quota if peer_quota is not None and peer_quota < 1 else None
        self.max_peer_entries = None if quota is None or max_records is None else max(1, int(max_records * quota))
        self.max_peer_bytes = None if quota is None or max_bytes is None else max(1, int(max_bytes * quota))
        self._slots: dict[DHTID, _Slot] = {}
        self._expirations: list[tuple[float, DHTID]] = []  # heap; may hold stale entries
        self._usage: dict[PeerID, list[int]] = {}  # payer -> [entries, bytes]
        self.nbytes = 0  # charged bytes of every record held

    # ---- storing ------------------------------------------------------------------------------

    def store(
        self,
        key_id: DHTID,
        value: bytes,
        expiration_time: float,
        subkey: bytes | None = None,
        signature: bytes | None = None,
        payer: PeerID | None = None,
    ) -> bool:
        """Apply one store under the rules in the module docstring; `payer` is the peer charged
        for it (None: nobody, e.g. this node itself). Returns whether it took effect. Never raises."""
        now = get_dht_time()
        if not expiration_time > now:  # also refuses NaN
            return False
        if self.max_value_bytes is not None and len(value) > self.max_value_bytes:
            return False
        owner = None
        if subkey is not None:
            try:
                owner = packed_subkey_owner(subkey)
            except ValueError:
                return False  # a malformed owner marker: nobody could ever sign for it
        if owner is None:
            signature = None
            if self.max_expiration is not None:
                expiration_time = min(expiration_time, now + self.max_expiration)
        else:
            if signature is None:
                return False
            if self.max_expiration is not None and expiration_time > now + self.max_expiration + CLOCK_SLACK_S:
                return False
            payer = owner  # whoever relays an owned entry, it is its owner's
        slot = self._live(key_id, now)
        if subkey is None:
            return self._store_regular(key_id, slot, value, expiration_time, payer)
        entry = SubkeyEntry(value, expiration_time, signature)
        return self._store_subkey(key_id, slot, subkey, entry, owner, payer)

    def _store_regular(
        self, key_id: DHTID, slot: _Slot | None, value: bytes, expiration_time: float, payer: PeerID | None
    ) -> bool:
        size = entry_bytes(None, value, None)
        if self.max_record_bytes is not None and size > self.max_record_bytes:
            return False
        # a dictionary with owned subkeys is never shadowed by an unowned value, however new
        if slot is not None and (slot.owned or slot.expiration_time >= expiration_time):
            return False
        same_payer = slot is not None and slot.subkeys is None and slot.payer == payer
        if not self._within_quota(payer, 0 if same_payer else 1, size - (slot.nbytes if same_payer else 0)):
            return False
        if slot is not None:
            self._drop(key_id, slot)
        new = _Slot(expiration_time, value, payer)
        new.nbytes = size
        self._slots[key_id] = new
        self.nbytes += size
        self._charge(payer, 1, size)
        heapq.heappush(self._expirations, (expiration_time, key_id))
        self._evict(get_dht_time())
        return self._slots.get(key_id) is new

    def _store_subkey(
        self,
        key_id: DHTID,
        slot: _Slot | None,
        subkey: bytes,
        entry: SubkeyEntry,
        owner: PeerID | None,
        payer: PeerID | None,
    ) -> bool:
        size = entry_bytes(subkey, entry.value, entry.signature)
        if self.max_record_bytes is not None and size > self.max_record_bytes:
            return False
        old: SubkeyEntry | None = None
        if slot is not None and slot.subkeys is None:
            # an owned entry takes a key over from a regular value whatever its expiration
            if owner is None and slot.expiration_time >= entry.expiration_time:
                return False
        elif slot is not None and slot.subkeys is not None:
            old = slot.subkeys.get(subkey)
            if old is not None and old.expiration_time >= entry.expiration_time:
                return False
        old_size = 0 if old is None else entry_bytes(subkey, old.value, old.signature)
        same_payer = old is not None and slot is not None and slot.payers.get(subkey) == payer
        if not self._within_quota(payer, 0 if same_payer else 1, size - (old_size if same_payer else 0)):
            return False
        evicted: list[bytes] = []
        if slot is not None and slot.subkeys is not None and self.max_record_bytes is not None:
            excess = slot.nbytes - old_size + size - self.max_record_bytes
            if excess > 0:
                found = self._unowned_to_evict(slot, excess, subkey) if owner is not None else None
                if found is None:
                    return False
                evicted = found
        # the signature check is the costly part: only once everything else says yes
        if owner is not None and not verify_entry(
            owner, entry.signature, key_id.to_bytes_(), subkey, entry.value, entry.expiration_time
        ):
            return False
        if slot is not None and slot.subkeys is None:
            self._drop(key_id, slot)
            slot = None
        if slot is None:
            slot = _Slot(entry.expiration_time)
            self._slots[key_id] = slot
            heapq.heappush(self._expirations, (entry.expiration_time, key_id))
        assert slot.subkeys is not None
        for sub in evicted:
            self._remove_entry(slot, sub)
        if evicted:  # the latest subkey may be gone: the record now expires with what is left
            self._reset_expiration(key_id, slot, max((e.expiration_time for e in slot.subkeys.values()), default=0.0))
        if old is not None:
            self._remove_entry(slot, subkey)
        slot.subkeys[subkey] = entry
        slot.nbytes += size
        self.nbytes += size
        slot.owned += entry.signature is not None
        if payer is not None:
            slot.payers[subkey] = payer
        self._charge(payer, 1, size)
        heapq.heappush(slot.heap, (entry.expiration_time, subkey))
        if len(slot.heap) > 2 * len(slot.subkeys) + 16:
            slot.heap = [(e.expiration_time, sub) for sub, e in slot.subkeys.items()]
            heapq.heapify(slot.heap)
        if entry.expiration_time > slot.expiration_time:
            self._reset_expiration(key_id, slot, entry.expiration_time)
        self._evict(get_dht_time())
        return self._slots.get(key_id) is slot and slot.subkeys.get(subkey) is entry

    def _unowned_to_evict(self, slot: _Slot, excess: int, keep: bytes) -> list[bytes] | None:
        """Unowned subkeys, soonest to expire first, that free `excess` bytes; None if they cannot."""
        assert slot.subkeys is not None
        unowned = sorted(
            (e.expiration_time, sub) for sub, e in slot.subkeys.items() if e.signature is None and sub != keep
        )
        chosen, freed = [], 0
        for _, sub in unowned:
            if freed >= excess:
                break
            entry = slot.subkeys[sub]
            chosen.append(sub)
            freed += entry_bytes(sub, entry.value, entry.signature)
        return chosen if freed >= excess else None

    # ---- bookkeeping --------------------------------------------------------------------------

    def _within_quota(self, payer: PeerID | None, entries: int, nbytes: int) -> bool:
        if payer is None:
            return True
        used = self._usage.get(payer, [0, 0])
        if self.max_peer_entries is not None and entries > 0 and used[0] + entries > self.max_peer_entries:
            return False
        return self.max_peer_bytes is None or nbytes <= 0 or used[1] + nbytes <= self.max_peer_bytes

    def _charge(self, payer: PeerID | None, entries: int, nbytes: int) -> None:
        if payer is None:
            return
        used = self._usage.setdefault(payer, [0, 0])
        used[0] += entries
        used[1] += nbytes
        if used[0] <= 0:
            del self._usage[payer]

    def _reset_expiration(self, key_id: DHTID, slot: _Slot, expiration_time: float) -> None:
        slot.expiration_time = expiration_time
        heapq.heappush(self._expirations, (expiration_time, key_id))

    def _remove_entry(self, slot: _Slot, subkey: bytes) -> None:
        assert slot.subkeys is not None
        entry = slot.subkeys.pop(subkey)
        size = entry_bytes(subkey, entry.value, entry.signature)
        slot.nbytes -= size
        self.nbytes -= size
        slot.owned -= entry.signature is not None
        self._charge(slot.payers.pop(subkey, None), -1, -size)

    def _drop(self, key_id: DHTID, slot: _Slot) -> None:
        del self._slots[key_id]
        self.nbytes -= slot.nbytes
        if slot.subkeys is None:
            self._charge(slot.payer, -1, -slot.nbytes)
            return
        for sub, payer in slot.payers.items():
            entry = slot.subkeys[sub]
            self._charge(payer, -1, -entry_bytes(sub, entry.value, entry.signature))

    def _live(self, key_id: DHTID, now: float) -> _Slot | None:
        """The slot under `key_id` with its expired subkeys removed, or None."""
        slot = self._slots.get(key_id)
        if slot is None:
            return None
        if slot.expiration_time <= now:
            self._drop(key_id, slot)
            return None
        if slot.subkeys is not None:
            while slot.heap and slot.heap[0][0] <= now:
                expiration, sub = heapq.heappop(slot.heap)
                entry = slot.subkeys.get(sub)
                if entry is not None and entry.expiration_time == expiration:
                    self._remove_entry(slot, sub)
            if not slot.subkeys:
                self._drop(key_id, slot)
                return None
        return slot

    def _over_capacity(self) -> bool:
        return (self.max_records is not None and len(self._slots) > self.max_records) or (
            self.max_bytes is not None and self.nbytes > self.max_bytes
        )

    def _evict(self, now: float) -> None:
        while self._expirations and (self._expirations[0][0] <= now or self._over_capacity()):
            expiration, key_id = heapq.heappop(self._expirations)
            slot = self._slots.get(key_id)
            if slot is not None and slot.expiration_time == expiration:
                self._drop(key_id, slot)  # expired, or the soonest to expire when over capacity
        if len(self._expirations) > 4 * len(self._slots) + 64:  # drop stale heap entries
            self._expirations = [(slot.expiration_time, k) for k, slot in self._slots.items()]
            heapq.heapify(self._expirations)

    # ---- reading ------------------------------------------------------------------------------

    def get(self, key_id: DHTID) -> Record | None:
        """The live record under `key_id` (expired subkeys removed; a copy), or None."""
        slot = self._live(key_id, get_dht_time())
        if slot is None:
            return None
        if slot.subkeys is None:
            return Record(slot.value, slot.expiration_time)
        return Record(None, slot.expiration_time, dict(slot.subkeys))

    def has_owned(self, key_id: DHTID) -> bool:
        """Whether the record under `key_id` is a dictionary holding an owned subkey."""
        slot = self._live(key_id, get_dht_time())
        return slot is not None and slot.owned > 0

    def peer_usage(self, peer: PeerID) -> tuple[int, int]:
        """(entries, bytes) stored on behalf of `peer`."""
        entries, nbytes = self._usage.get(peer, (0, 0))
        return entries, nbytes

    def keys(self) -> list[DHTID]:
        self._evict(get_dht_time())
        return list(self._slots)

    def items(self) -> Iterator[tuple[DHTID, Record]]:
        for key_id in self.keys():
            record = self.get(key_id)
            if record is not None:
                yield key_id, record

    def __len__(self) -> int:
        self._evict(get_dht_time())
        return len(self._slots)

    def __contains__(self, key_id: object) -> bool:
        return isinstance(key_id, DHTID) and self._live(key_id, get_dht_time()) is not None


def _has_owned(record: Record) -> bool:
    return record.subkeys is not None and any(e.signature is not None for e in record.subkeys.values())


def merge_records(a: Record | None, b: Record | None) -> Record | None:
    """Combine two views of one key as a node would after receiving both: newest wins, per
    subkey, except that a dictionary holding an owned subkey beats any regular value."""
    if a is None or b is None:
        return a or b
    if a.subkeys is None or b.subkeys is None:
        if a.subkeys is None and b.subkeys is None:
            return a if a.expiration_time >= b.expiration_time else b
        regular, dictionary = (a, b) if a.subkeys is None else (b, a)
        if _has_owned(dictionary):
            return dictionary
        return regular if regular.expiration_time >= dictionary.expiration_time else dictionary
    merged = dict(a.subkeys)
    for subkey, entry in b.subkeys.items():
        old = merged.get(subkey)
        if old is None or old.expiration_time < entry.expiration_time:
            merged[subkey] = entry
    return Record(None, max(e.expiration_time for e in merged.values()), merged)
