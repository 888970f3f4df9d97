"""Owned records, their signatures, and how records travel on the wire.

A subkey whose msgpack bytes contain the marker `[owner:<base58 peer id>]` (as hivemind's
`[owner:...]`) belongs to that peer: a node stores a value under it only together with a valid
Ed25519 signature by the owner over

    DOMAIN_TAG | key_id (20 bytes) | u32 len | subkey bytes | u32 len | value bytes | f64 expiration

(big-endian, the expiration as an IEEE double). The signature travels with the entry through
every store, replication, cache and find, unchanged, so any node or reader can check it: peer IDs
embed their public key. Subkeys without the marker stay writable by anyone (first come, newest
expiration wins), and regular (subkey-less) values are never owned.

A marker that names no valid peer ID, or two different peers, makes the subkey unstorable: its
owner could never be checked.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from typing import Any, NamedTuple

from hivecli._exceptions import HandshakeError
from hivecli.net.framing import pack
from hivecli.net.identity import Identity, PeerID

DOMAIN_TAG = b"hivecli/dht/owned-subkey/v1\x00"
_MARKER = b"[owner:"
_MAX_PEER_ID_CHARS = 64  # a base58 Ed25519 peer ID is 52 characters
_U32 = struct.Struct(">I")
_F64 = struct.Struct(">d")
_VERIFIED_CACHE_SIZE = 65536
ENTRY_OVERHEAD = 32  # bytes charged per stored entry for msgpack framing and bookkeeping


class SubkeyEntry(NamedTuple):
    """One subkey of a dictionary record; `signature` is set for (and only for) owned subkeys."""

    value: bytes
    expiration_time: float
    signature: bytes | None = None


class Record(NamedTuple):
    """What a node holds under one key: a regular value (`subkeys` is None) or a dictionary,
    whose `expiration_time` is that of its latest subkey."""

    value: bytes | None
    expiration_time: float
    subkeys: dict[bytes, SubkeyEntry] | None = None


def owned_subkey(peer_id: PeerID, name: str = "") -> str:
    """A subkey only `peer_id` can write: `name` followed by the `[owner:...]` marker."""
    return f"{name}[owner:{peer_id.to_base58()}]"


def packed_subkey_owner(subkey: bytes) -> PeerID | None:
    """The owner named by a subkey's msgpack bytes, or None if it carries no owner marker.

    Raises:
        ValueError: the marker is there but is unterminated, names no valid peer ID, or names
            two different peers (such a subkey can never be stored).
    """
    start = subkey.find(_MARKER)
    owner: PeerID | None = None
    while start >= 0:
        begin = start + len(_MARKER)
        end = subkey.find(b"]", begin, begin + _MAX_PEER_ID_CHARS + 1)
        if end < 0:
            raise ValueError("an [owner:...] marker is not closed by ']' after a peer ID")
        try:
            peer = PeerID.from_base58(subkey[begin:end].decode("ascii"))
        except UnicodeDecodeError:
            raise ValueError("an [owner:...] marker holds non-ASCII characters") from None
        if owner is not None and peer != owner:
            raise ValueError(f"the subkey names two owners, {owner} and {peer}")
        owner = peer
        start = subkey.find(_MARKER, end)
    return owner


def subkey_owner(subkey: Any) -> PeerID | None:
    """The owner of a (decoded) subkey as a client passes it to `store`, or None if unowned.

    Raises:
        ValueError: the subkey carries a malformed owner marker (see `packed_subkey_owner`), or
            cannot be serialized with msgpack.
    """
    try:
        packed = pack(subkey)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"the subkey is not msgpack-serializable: {e}") from None
    return packed_subkey_owner(packed)


def owned_entries(found: Any) -> list[tuple[PeerID, Any, float]]:
    """(owner, value, expiration) of the owned entries of a dictionary value as `get` returns it;
    unowned entries are anybody's word and are skipped, as are malformed owner markers (no node
    stores one, so a hostile node sent it)."""
    if found is None or not isinstance(getattr(found, "value", None), dict):
        return []
    entries = []
    for subkey, entry in found.value.items():
        try:
            owner = subkey_owner(subkey)
        except ValueError:
            continue
        if owner is not None:
            entries.append((owner, entry.value, entry.expiration_time))
    return entries


def signed_message(key_id: bytes, subkey: bytes, value: bytes, expiration_time: float) -> bytes:
    """The exact bytes an owner signs for one entry (see the module docstring)."""
    return b"".join(
        (DOMAIN_TAG, key_id, _U32.pack(len(subkey)), subkey, _U32.pack(len(value)), value, _F64.pack(expiration_time))
    )


def sign_entry(identity: Identity, key_id: bytes, subkey: bytes, value: bytes, expiration_time: float) -> bytes:
    """Sign one owned entry with `identity` (which should be the subkey's owner)."""
    return identity.sign(signed_message(key_id, subkey, value, expiration_time))


# Digests of (signature, message) pairs that verified: one record reaches a node from several
# replicas, caches and re-stores, and an Ed25519 check costs ~50-100 us each time.
_verified: OrderedDict[bytes, None] = OrderedDict()
_verified_lock = threading.Lock()  # DHTs in several threads of one process share it


def verify_entry(
    owner: PeerID, signature: Any, key_id: bytes, subkey: bytes, value: bytes, expiration_time: float
) -> bool:
    """Whether `signature` is `owner`'s signature of this entry. Never raises."""
    if not isinstance(signature, bytes) or len(signature) != 64:
        return False
    message = signed_message(key_id, subkey, value, expiration_time)
    digest_state = hashlib.blake2b(signature, digest_size=20)
    digest_state.update(message)
    digest = digest_state.digest()
    with _verified_lock:
        if digest in _verified:
            _verified.move_to_end(digest)
            return True
    try:
        owner.verify(signature, message)
    except (HandshakeError, ValueError):
        return False
    with _verified_lock:
        _verified[digest] = None
        if len(_verified) > _VERIFIED_CACHE_SIZE:
            _verified.popitem(last=False)
    return True


def entry_is_authentic(key_id: bytes, subkey: bytes | None, entry: SubkeyEntry) -> bool:
    """Whether an entry may be stored or believed: unowned (any signature on it means nothing
    and is dropped on store), or owned and signed by its owner."""
    if subkey is None:
        return True
    try:
        owner = packed_subkey_owner(subkey)
    except ValueError:
        return False
    if owner is None:
        return True
    return verify_entry(owner, entry.signature, key_id, subkey, entry.value, entry.expiration_time)


def entry_bytes(subkey: bytes | None, value: bytes, signature: bytes | None) -> int:
    """What one entry is charged in storage quotas and reply budgets (about its wire size)."""
    return (len(subkey) if subkey else 0) + len(value) + (len(signature) if signature else 0) + ENTRY_OVERHEAD


def record_bytes(record: Record) -> int:
    """About the wire size of a record: the sum of `entry_bytes` over its entries."""
    if record.subkeys is None:
        return entry_bytes(None, record.value or b"", None)
    return sum(entry_bytes(sub, e.value, e.signature) for sub, e in record.subkeys.items())


# ---- wire form ------------------------------------------------------------------------------


def encode_record(record: Record) -> list[Any]:
    """`[expiration, value]` or `[expiration, None, [[subkey, value, expiration(, signature)], ...]]`."""
    if record.subkeys is None:
        return [record.expiration_time, record.value]
    return [
        record.expiration_time,
        None,
        [
            [sub, e.value, e.expiration_time] if e.signature is None else [sub, e.value, e.expiration_time, e.signature]
            for sub, e in record.subkeys.items()
        ],
    ]


def _is_time(value: Any) -> bool:
    # NaN compares false with everything: it would slip past every expiration check
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def decode_record(raw: Any) -> Record:
    """Parse a record from the wire (signatures are not checked here: see `entry_is_authentic`).

    Raises:
        ValueError: naming what is malformed.
    """
    if not isinstance(raw, list) or len(raw) not in (2, 3) or not _is_time(raw[0]):
        raise ValueError(f"record {str(raw)[:60]} is not [expiration, value(, entries)]")
    if len(raw) == 2:
        if not isinstance(raw[1], bytes):
            raise ValueError("record value must be bytes")
        return Record(raw[1], float(raw[0]))
    if not isinstance(raw[2], list):
        raise ValueError("dictionary entries must be a list")
    subkeys: dict[bytes, SubkeyEntry] = {}
    for entry in raw[2]:
        if (
            not isinstance(entry, list)
            or len(entry) not in (3, 4)
            or not isinstance(entry[0], bytes)
            or not isinstance(entry[1], bytes)
            or not _is_time(entry[2])
            or (len(entry) == 4 and not isinstance(entry[3], (bytes, type(None))))
        ):
            raise ValueError("dictionary entries must be [subkey, value, expiration(, signature)]")
        subkeys[entry[0]] = SubkeyEntry(entry[1], float(entry[2]), entry[3] if len(entry) == 4 else None)
    if not subkeys:
        raise ValueError("a dictionary record has no entries")
    return Record(None, max(e.expiration_time for e in subkeys.values()), subkeys)


def store_item(
    key_id: bytes, subkey: bytes | None, value: bytes, expiration_time: float, in_cache: bool, signature: bytes | None
) -> list[Any]:
    """One `dht.store` item; the signature field is sent only when there is one, so unsigned
    items stay readable by nodes that predate it."""
    item: list[Any] = [key_id, subkey, value, expiration_time, in_cache]
    if signature is not None:
        item.append(signature)
    return item


def record_items(key_id: bytes, record: Record, in_cache: bool = False) -> list[list[Any]]:
    """A record as `dht.store` items (one per subkey for a dictionary), signatures included."""
    if record.subkeys is None:
        return [store_item(key_id, None, record.value or b"", record.expiration_time, in_cache, None)]
    return [
        store_item(key_id, sub, e.value, e.expiration_time, in_cache, e.signature) for sub, e in record.subkeys.items()
    ]
