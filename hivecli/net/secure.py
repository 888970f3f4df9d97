"""Encrypted, integrity-protected links and private-swarm keys.

After the handshake (`handshake.py`) agrees on one key per direction, `SecureStream` seals
every byte written into records:

    +------------------+--------------------------------+---------------+
    | length u32 (BE)  | ciphertext (length bytes)      | tag, 16 bytes |
    +------------------+--------------------------------+---------------+

The cipher is AES-256-GCM (on CPUs with AES instructions it runs about 3x faster than
ChaCha20-Poly1305, see `_CIPHER`). The length travels in clear but is authenticated as associated
data. The nonce is never sent: each direction counts its records from 0 (a 64-bit counter in
the low bytes of the 96-bit nonce), so a record that is replayed, dropped or reordered fails
to verify just like a modified one. A length over `MAX_RECORD_BYTES` is refused before a byte
of the record is read.

A swarm key is a 32-byte secret shared by every peer of a private swarm. The handshake mixes
it into the session keys and makes each side prove it holds it, so a peer without the key
cannot connect to any member.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hivecli._exceptions import ConfigError, FrameTooLargeError, ProtocolError
from hivecli.net.transport import ByteStream, SendStats

SWARM_KEY_BYTES = 32
SWARM_KEY_HEADER = "hive-swarm-key/v1"
KEY_BYTES = 32  # one AES-256 key per direction
TAG_BYTES = 16
# Measured over loopback TCP (/tmp/secure_bench.py, 200 MB in 4 MiB writes): 1 MiB records ran
# 870 MB/s on the asyncio loop and 1280 MB/s on uvloop, 256 KiB records 690 and 960 MB/s (the
# per-record cost is a loop iteration and two receives). The receive buffer still grows only as
# ciphertext arrives, so the larger size costs nothing when a peer lies about a length.
MAX_RECORD_BYTES = 1024 * 1024

# AES-256-GCM (AES-NI/VAES) sealed+opened 1 MiB records at 5.1 GB/s on the development machine,
# ChaCha20-Poly1305 at 1.8 GB/s; over loopback TCP AES-GCM also won at every record size.
# Both sides must use the same cipher: changing it means a new handshake protocol version.
_CIPHER = AESGCM
RECORD_LENGTH = struct.Struct(">I")
_NONCE = struct.Struct(">4xQ")  # 32 zero bits, then the record counter
# A direction's records are numbered 0 .. 2**64 - 1: the stream refuses to go on rather than
# reuse a nonce under the same key (at 10 GB/s of 1-byte records that is still 58,000 years away).
_MAX_RECORDS = 2**64
# The receive buffer grows as ciphertext arrives, in steps of at most doubling from here, so a
# peer that declares a full-size record and then stalls costs us only what it actually sent.
_FIRST_SCRATCH_BYTES = 16 * 1024


def record_cipher(key: bytes) -> AESGCM:
    """The cipher that seals (or opens) one direction's records under `key`."""
    return _CIPHER(key)


def seal_record(cipher: AESGCM, number: int, plain: bytes | memoryview) -> bytearray:
    """Record `number` of a direction, holding `plain` (at most MAX_RECORD_BYTES): its length,
    then the ciphertext sealed straight into the record buffer (the plaintext is read once,
    never copied), then the tag."""
    length = RECORD_LENGTH.pack(len(plain))
    record = bytearray(RECORD_LENGTH.size + len(plain) + TAG_BYTES)
    record[: RECORD_LENGTH.size] = length
    cipher.encrypt_into(_NONCE.pack(number), plain, length, memoryview(record)[RECORD_LENGTH.size :])
    return record


def open_record(
    cipher: AESGCM, number: int, header: bytes, sealed: bytes | memoryview, into: memoryview | None = None
) -> bytes:
    """Verify and decrypt record `number` (its length `header`, then ciphertext + tag) into
    `into` (exactly its length; returns b"") or as new bytes.

    Raises:
        InvalidTag: it was modified, replayed, reordered or forged.
    """
    nonce = _NONCE.pack(number)
    if into is not None:
        cipher.decrypt_into(nonce, sealed, header, into)
        return b""
    return cipher.decrypt(nonce, sealed, header)


class RecordIntegrityError(ProtocolError):
    """An encrypted record failed its integrity check: modified, replayed, reordered or forged."""


@dataclass(frozen=True)
class SecuritySettings:
    """How a node protects its links.

    Attributes:
        encrypt: seal all traffic after the handshake (AES-256-GCM). Links are unencrypted only
            when both ends set this to False, e.g. for benchmarks on a trusted network; a peer
            that requires encryption refuses one that turned it off.
        swarm_key: the 32-byte secret of a private swarm (see `load_swarm_key`), or None for
            the public swarm. Peers connect only to peers holding the same key; it is never sent.
        encrypt_same_host: also seal a link whose two ends are on this host (a TCP connection
            between loopback addresses, or from one of our addresses to itself). Off by default:
            such bytes never leave the kernel, so no one off this host can read or change them,
            and sealing them made a same-host all-reduce 1.6-1.8x slower. Turn it on where
            other tenants of this host's network namespace may capture its loopback traffic
            (containers sharing the host's network with CAP_NET_RAW). A link goes unsealed only
            when both ends see it as same-host and neither turned this on; the handshake
            authenticates it either way.
    """

    encrypt: bool = True
    swarm_key: bytes | None = field(default=None, repr=False)  # a secret: keep it out of logs
    encrypt_same_host: bool = False

    def __post_init__(self) -> None:
        """Raises ConfigError: `swarm_key` is not 32 bytes."""
        if self.swarm_key is not None and (
            not isinstance(self.swarm_key, bytes) or len(self.swarm_key) != SWARM_KEY_BYTES
        ):
            size = len(self.swarm_key) if isinstance(self.swarm_key, bytes | bytearray) else type(self.swarm_key)
            raise ConfigError(
                f"a swarm key must be {SWARM_KEY_BYTES} bytes, got {size}; "
                f"load one with load_swarm_key() from a file made by `hive keygen --swarm-key PATH`"
            )

    def __repr__(self) -> str:
        swarm = "None" if self.swarm_key is None else f"<fingerprint {swarm_key_fingerprint(self.swarm_key)}>"
        return (
            f"SecuritySettings(encrypt={self.encrypt}, swarm_key={swarm}, encrypt_same_host={self.encrypt_same_host})"
        )


# ---- swarm key files ---------------------------------------------------------------------------


def swarm_key_fingerprint(key: bytes) -> str:
    """A short name for a swarm key, safe to print and log: the first 8 hex digits of its SHA-256.

    It tells operators whether two peers hold the same key; 32 bits of a hash reveal nothing
    useful about a 256-bit random key.
    """
    return hashlib.sha256(key).hexdigest()[:8]


def generate_swarm_key(path: str | os.PathLike[str]) -> bytes:
    """Create a new random swarm key and write it to `path` (mode 0600), returning the key.

    Raises:
        ConfigError: `path` already exists (it is never overwritten: peers still using that key
            would be locked out), or it cannot be created.
    """
    path = Path(path)
    key = os.urandom(SWARM_KEY_BYTES)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: refusing an existing file is atomic, even if two keygens race
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(
            f"swarm key file {str(path)!r} already exists and is not overwritten (peers holding that key "
            f"would be locked out); use it as it is, or delete it first if you really want a new swarm key"
        ) from None
    except OSError as e:
        raise ConfigError(
            f"cannot create swarm key file {str(path)!r}: {e.strerror or e}; choose a path in a writable folder"
        ) from None
    with os.fdopen(fd, "w", encoding="ascii") as file:
        file.write(f"{SWARM_KEY_HEADER}\n{key.hex()}\n")
    return key


def load_swarm_key(path: str | os.PathLike[str]) -> bytes:
    """Read a swarm key written by `generate_swarm_key`.

    Raises:
        ConfigError: the file is missing, unreadable, or does not hold a hive swarm key.
    """
    path = Path(path)
    create_hint = f"`hive keygen --swarm-key {path}` creates one; copy that same file to every peer of the swarm"
    try:
        with path.open("rb") as file:
            raw = file.read(1024)  # a key file is ~84 bytes; do not slurp a huge file given by mistake
    except FileNotFoundError:
        raise ConfigError(f"swarm key file {str(path)!r} does not exist; {create_hint}") from None
    except OSError as e:
        raise ConfigError(
            f"cannot read swarm key file {str(path)!r}: {e.strerror or e}; check its path and permissions"
        ) from None
    bad = (
        f"swarm key file {str(path)!r} does not hold a hive swarm key (expected a line {SWARM_KEY_HEADER!r} "
        f"followed by {2 * SWARM_KEY_BYTES} hex digits); copy the swarm's key file again from a peer, or {create_hint}"
    )
    try:
        lines = raw.decode("ascii").split()
    except UnicodeDecodeError:
        raise ConfigError(bad) from None
    if len(lines) != 2 or lines[0] != SWARM_KEY_HEADER or len(lines[1]) != 2 * SWARM_KEY_BYTES:
        raise ConfigError(bad)
    try:
        return bytes.fromhex(lines[1])
    except ValueError:
        raise ConfigError(bad) from None


# ---- the record layer --------------------------------------------------------------------------


class SecureStream(ByteStream):
    """A ByteStream that seals what it writes and opens what it reads, over another ByteStream.

    One task may read at a time (the connection's read loop); writes never await, so records
    from concurrent writers never interleave. After an integrity failure or an oversized record
    the stream is closed and every later read raises the same error: nothing after a bad record
    can be trusted.
    """

    sealed = True

    def __init__(self, inner: ByteStream, send_key: bytes, receive_key: bytes) -> None:
        """Wrap `inner`, whose handshake produced these keys.

        Raises:
            ValueError: a key is not 32 bytes.
        """
        if len(send_key) != KEY_BYTES or len(receive_key) != KEY_BYTES:
            raise ValueError(f"SecureStream keys must be {KEY_BYTES} bytes each")
        if send_key == receive_key:  # would let a reflected record verify; the handshake never does this
            raise ValueError("SecureStream needs a different key for each direction")
        self._inner = inner
        self.remote_host, self.same_host, self.relayed = inner.remote_host, inner.same_host, inner.relayed
        self._sealer = record_cipher(send_key)
        self._opener = record_cipher(receive_key)
        self._sent = 0  # records sealed so far: the next send nonce
        self._received = 0  # records opened so far: the next receive nonce
        self._plain: bytes = b""  # decrypted bytes of the current record not yet read ...
        self._plain_pos = 0  # ... start here
        self._scratch = bytearray()  # where ciphertext lands before it is opened
        self._failure: ProtocolError | None = None

    # ---- writing -------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Seal `data` into records and queue them; never blocks.

        Raises:
            ConnectionResetError: the stream is closed, or this direction has used up its nonces.
        """
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        # One buffer and one inner write per record: measured faster on the asyncio loop (and
        # as fast on uvloop) than sealing a whole write into one buffer.
        for start in range(0, len(view), MAX_RECORD_BYTES):
            chunk = view[start : start + MAX_RECORD_BYTES]
            if self._sent >= _MAX_RECORDS:
                self.close()
                raise ConnectionResetError(
                    "this connection sealed 2**64 records and cannot go on without reusing a nonce; reconnect"
                )
            record = seal_record(self._sealer, self._sent, chunk)
            self._sent += 1
            self._inner.write(record)

    async def drain(self) -> None:
        """Wait for send-buffer space. Raises ConnectionError if the stream is closed."""
        await self._inner.drain()

    def write_buffer_size(self) -> int:
        """Sealed bytes queued for sending (each record is 20 bytes more than its plaintext)."""
        return self._inner.write_buffer_size()

    def set_max_rate(self, bytes_per_second: float | None) -> bool:
        return self._inner.set_max_rate(bytes_per_second)

    def send_stats(self) -> SendStats | None:
        return self._inner.send_stats()

    def close(self) -> None:
        self._inner.close()

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    # ---- reading -------------------------------------------------------------------------------

    async def read_exactly(self, n: int) -> bytes:
        """Read exactly n plaintext bytes; memory grows as records arrive, not ahead of them.

        Raises:
            asyncio.IncompleteReadError: the stream ended first.
            RecordIntegrityError: a record was modified, replayed, reordered or forged.
            FrameTooLargeError: the peer declared a record over MAX_RECORD_BYTES.
        """
        if self._failure is not None:
            raise self._failure
        buffered = len(self._plain) - self._plain_pos
        if n <= buffered:
            self._plain_pos += n
            return self._plain[self._plain_pos - n : self._plain_pos]
        parts = [self._plain[self._plain_pos :]]
        have = buffered
        self._plain, self._plain_pos = b"", 0
        while have < n:
            try:
                header, sealed = await self._read_sealed()
            except asyncio.IncompleteReadError:
                raise asyncio.IncompleteReadError(b"".join(parts), n) from None
            plain = self._open(header, sealed)
            take = min(n - have, len(plain))
            if take < len(plain):  # the record runs past n: keep its tail for the next read
                parts.append(plain[:take])
                self._plain, self._plain_pos = plain, take
            else:
                parts.append(plain)
            have += take
        return b"".join(parts)

    async def read_into(self, view: memoryview) -> None:
        """Fill `view` with the next len(view) plaintext bytes.

        Records that lie entirely inside `view` are decrypted straight into it, so a tensor
        payload is copied once by the kernel (into the ciphertext buffer) and once by the cipher.
        If a record fails its check, `view` may hold unauthenticated bytes of it: the error says
        its contents are worthless.

        Raises:
            asyncio.IncompleteReadError: the stream ended first.
            RecordIntegrityError: a record was modified, replayed, reordered or forged.
            FrameTooLargeError: the peer declared a record over MAX_RECORD_BYTES.
        """
        if self._failure is not None:
            raise self._failure
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        size = len(view)
        pos = min(size, len(self._plain) - self._plain_pos)
        view[:pos] = self._plain[self._plain_pos : self._plain_pos + pos]
        self._plain_pos += pos
        if self._plain_pos == len(self._plain):
            self._plain, self._plain_pos = b"", 0
        while pos < size:
            try:
                header, sealed = await self._read_sealed()
            except asyncio.IncompleteReadError:
                raise asyncio.IncompleteReadError(bytes(view[:pos]), size) from None
            length = len(sealed) - TAG_BYTES
            if length <= size - pos:
                self._open(header, sealed, into=view[pos : pos + length])
                pos += length
            else:  # the record runs past the view: keep its tail for the next read
                plain = self._open(header, sealed)
                take = size - pos
                view[pos:] = plain[:take]
                self._plain, self._plain_pos = plain, take
                pos = size

    async def _read_sealed(self) -> tuple[bytes, memoryview]:
        """Read the next record: its length header and its ciphertext + tag (a view of the
        scratch buffer, valid until the next record is read).

        Raises:
            asyncio.IncompleteReadError: the stream ended, possibly mid-record.
            FrameTooLargeError: the declared length is over MAX_RECORD_BYTES (the stream is closed).
        """
        header = await self._inner.read_exactly(RECORD_LENGTH.size)
        (length,) = RECORD_LENGTH.unpack(header)
        if length > MAX_RECORD_BYTES:  # checked before reading on: a liar costs us 4 bytes
            raise self._fail(
                FrameTooLargeError(
                    f"peer at {self.remote_host} declared an encrypted record of {length} bytes, over the "
                    f"limit of {MAX_RECORD_BYTES} bytes; it is not a correct hive peer"
                )
            )
        return header, await self._receive(length + TAG_BYTES)

    def _open(self, header: bytes, sealed: memoryview, into: memoryview | None = None) -> bytes:
        """Verify and decrypt the next record, into `into` (exactly its length; returns b"") or as
        new bytes.

        Raises:
            RecordIntegrityError: the tag does not verify under the next nonce (the stream is closed).
        """
        if self._received >= _MAX_RECORDS:
            raise self._fail(RecordIntegrityError(f"peer at {self.remote_host} sent more than 2**64 records"))
        number = self._received
        self._received += 1
        try:
            return open_record(self._opener, number, header, sealed, into)
        except InvalidTag:
            raise self._fail(
                RecordIntegrityError(
                    f"integrity check failed on encrypted record {self._received - 1} from peer at "
                    f"{self.remote_host}: it was modified, replayed or reordered on the way; dropping the connection"
                )
            ) from None

    async def _receive(self, n: int) -> memoryview:
        """Fill the first n bytes of the scratch buffer from the inner stream and return them.

        The buffer grows (at most doubling) only once the bytes it holds have arrived.

        Raises:
            asyncio.IncompleteReadError: the stream ended first.
        """
        filled = 0
        while len(self._scratch) < n:
            if filled < len(self._scratch):
                await self._inner.read_into(memoryview(self._scratch)[filled:])
                filled = len(self._scratch)
            grown = bytearray(min(n, max(_FIRST_SCRATCH_BYTES, 2 * len(self._scratch))))
            grown[:filled] = self._scratch[:filled]
            self._scratch = grown
        if filled < n:
            await self._inner.read_into(memoryview(self._scratch)[filled:n])
        return memoryview(self._scratch)[:n]

    def _fail(self, error: ProtocolError) -> ProtocolError:
        """Remember `error` for every later read and close the stream; returns it to raise."""
        self._failure = error
        self._plain, self._plain_pos = b"", 0
        self._inner.close()
        return error
