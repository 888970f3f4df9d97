"""Peer identity: an Ed25519 key pair and the peer ID derived from its public key.

The peer ID uses libp2p's encoding (an identity multihash of the protobuf-framed public key,
printed in base58btc), so IDs look familiar ("12D3KooW...") and embed the public key: anyone
holding a peer ID can check a signature made by that peer without a key lookup.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hivecli._exceptions import ConfigError, HandshakeError

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}

# protobuf PublicKey{Type: Ed25519 (1), Data: 32 bytes}, wrapped in an identity multihash (0x00, len 36)
_PUBKEY_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])
_MULTIHASH_PREFIX = bytes([0x00, len(_PUBKEY_PREFIX) + 32])
PEER_ID_LENGTH = len(_MULTIHASH_PREFIX) + len(_PUBKEY_PREFIX) + 32


def b58encode(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    chars = []
    while number:
        number, rem = divmod(number, 58)
        chars.append(_B58_ALPHABET[rem])
    leading_zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * leading_zeros + "".join(reversed(chars))


def b58decode(text: str) -> bytes:
    """Decode base58btc. Raises ValueError naming the first character outside the alphabet."""
    number = 0
    for char in text:
        if char not in _B58_INDEX:
            raise ValueError(f"{char!r} is not a base58 character")
        number = number * 58 + _B58_INDEX[char]
    leading_zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * leading_zeros + body


@functools.total_ordering
class PeerID:
    """A peer's identity on the network: an immutable, hashable wrapper around its ID bytes."""

    __slots__ = ("_bytes", "_text")

    def __init__(self, raw: bytes):
        """Raises ValueError: `raw` is not the bytes of an Ed25519 peer ID (from the network: anything)."""
        if not isinstance(raw, bytes | bytearray):
            raise ValueError(f"a peer ID is bytes, not {type(raw).__name__}")
        if len(raw) != PEER_ID_LENGTH or not raw.startswith(_MULTIHASH_PREFIX + _PUBKEY_PREFIX):
            raise ValueError(
                f"{raw[:8].hex()}... ({len(raw)} bytes) is not an Ed25519 peer ID; "
                f"expected {PEER_ID_LENGTH} bytes starting with {(_MULTIHASH_PREFIX + _PUBKEY_PREFIX).hex()}"
            )
        self._bytes = bytes(raw)
        self._text: str | None = None

    @classmethod
    def from_base58(cls, text: str) -> PeerID:
        """Parse a printed peer ID. Raises ValueError with the reason if it is not one."""
        try:
            return _parse_base58(text)
        except ValueError as e:
            raise ValueError(f"{text!r} is not a peer ID: {e}") from None

    @classmethod
    def from_public_key(cls, public_key: Ed25519PublicKey) -> PeerID:
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(_MULTIHASH_PREFIX + _PUBKEY_PREFIX + raw)

    def to_bytes(self) -> bytes:
        return self._bytes

    def to_base58(self) -> str:
        if self._text is None:
            self._text = b58encode(self._bytes)
        return self._text

    def public_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self._bytes[-32:])

    def verify(self, signature: bytes, message: bytes) -> None:
        """Check that this peer signed `message`. Raises HandshakeError if not."""
        try:
            self.public_key().verify(signature, message)
        except InvalidSignature:
            raise HandshakeError(f"peer {self.to_base58()} sent a signature that does not verify") from None

    def __str__(self) -> str:
        return self.to_base58()

    def __repr__(self) -> str:
        return f"PeerID({self.to_base58()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PeerID) and self._bytes == other._bytes

    def __lt__(self, other: PeerID) -> bool:
        return self._bytes < other._bytes

    def __hash__(self) -> int:
        return hash(self._bytes)


class Identity:
    """An Ed25519 key pair: signs handshakes on behalf of `peer_id`."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._private_key = private_key
        self.peer_id = PeerID.from_public_key(private_key.public_key())

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the key stored at `path`, or create one there (mode 0600) if the file does not exist.

        Raises:
            ConfigError: the file exists but does not hold an unencrypted PEM Ed25519 private key.
        """
        path = Path(path)
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (OSError, ValueError, TypeError) as e:
                raise ConfigError(
                    f"identity file {str(path)!r} does not hold a PEM private key ({e}); "
                    f"point --identity at another path to create a fresh one"
                ) from None
            if not isinstance(key, Ed25519PrivateKey):
                raise ConfigError(
                    f"identity file {str(path)!r} holds a {type(key).__name__}, not an Ed25519 key; "
                    f"point --identity at another path to create a fresh one"
                )
            return cls(key)
        identity = cls.generate()
        pem = identity._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
        return identity

    def sign(self, message: bytes) -> bytes:
        return self._private_key.sign(message)


@functools.lru_cache(maxsize=1024)
def _parse_base58(text: str) -> PeerID:
    """PeerID.from_base58 without the error's context, cached: every DHT record and group
    member names peers in text, the same few peers round after round, and decoding base58 is a
    Python loop over 46 characters. Bounded, so strangers' made-up IDs only evict (errors are
    not cached)."""
    return PeerID(b58decode(text))
