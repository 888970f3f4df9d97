"""Identities, peer IDs, signatures, key files and base58."""

from __future__ import annotations

import base64
import os
import random
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hivecli._exceptions import ConfigError, HandshakeError
from hivecli.net.identity import PEER_ID_LENGTH, Identity, PeerID, b58decode, b58encode

# A key pair and peer ID printed by js-libp2p (libp2p protobuf-encoded keys, base64).
LIBP2P_PRIVATE_KEY = "CAESQOf+u8qrRXj0KnDcz+CjCveXh3xFKsj38B+LJuoWZqq5xoy+BiHu9GkmPrr2Bvo4sw6ZMXS4TnOvg0VP3DFi93s="
LIBP2P_PUBLIC_KEY = "CAESIMaMvgYh7vRpJj669gb6OLMOmTF0uE5zr4NFT9wxYvd7"
LIBP2P_PEER_ID = "12D3KooWPBRNBzgceXh7Z27wGoyYYz9ggwaYg2dWiwXXe8ieyFCN"


# ---- peer IDs -------------------------------------------------------------------------------


def test_peer_id_is_libp2p_style_base58_and_round_trips() -> None:
    for _ in range(20):
        peer_id = Identity.generate().peer_id
        text = peer_id.to_base58()
        assert text.startswith("12D3KooW"), text
        assert str(peer_id) == text
        assert repr(peer_id) == f"PeerID({text})"
        assert len(peer_id.to_bytes()) == PEER_ID_LENGTH
        parsed = PeerID.from_base58(text)
        assert parsed == peer_id
        assert hash(parsed) == hash(peer_id)
        assert parsed.to_bytes() == peer_id.to_bytes()
        assert b58decode(text) == peer_id.to_bytes()


def test_peer_id_matches_libp2p_encoding() -> None:
    """Same key as a js-libp2p node: same peer ID string, same protobuf public key."""
    raw = base64.b64decode(LIBP2P_PRIVATE_KEY)
    assert raw[:4] == bytes([0x08, 0x01, 0x12, 0x40])  # protobuf PrivateKey{Ed25519, 64 bytes}
    identity = Identity(Ed25519PrivateKey.from_private_bytes(raw[4:36]))
    assert identity.peer_id.to_base58() == LIBP2P_PEER_ID
    # identity multihash (0x00, length 36) of the protobuf public key
    assert identity.peer_id.to_bytes() == bytes([0x00, 36]) + base64.b64decode(LIBP2P_PUBLIC_KEY)
    assert PeerID.from_base58(LIBP2P_PEER_ID) == identity.peer_id


@pytest.mark.parametrize("raw", ["0", None, 5, [1, 2], b"\x00" * 38])
def test_anything_but_the_bytes_of_a_peer_id_is_a_value_error(raw: object) -> None:
    with pytest.raises(ValueError, match="peer ID"):
        PeerID(raw)  # type: ignore[arg-type]


def test_distinct_identities_have_distinct_peer_ids() -> None:
    ids = {Identity.generate().peer_id for _ in range(50)}
    assert len(ids) == 50


def test_peer_ids_order_by_bytes() -> None:
    ids = [Identity.generate().peer_id for _ in range(10)]
    assert [p.to_bytes() for p in sorted(ids)] == sorted(p.to_bytes() for p in ids)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "is not an Ed25519 peer ID"),
        ("12D3KooW", "is not an Ed25519 peer ID"),
        ("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "is not an Ed25519 peer ID"),  # sha256 multihash
        ("12D3KooW0", "'0' is not a base58 character"),
        ("12D3KooWl", "'l' is not a base58 character"),
        ("12D3KooW PBRN", "' ' is not a base58 character"),
    ],
)
def test_from_base58_rejects_non_peer_ids(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        PeerID.from_base58(text)
    assert repr(text) in str(info.value)
    assert reason in str(info.value)


def test_peer_id_rejects_wrong_bytes() -> None:
    good = Identity.generate().peer_id.to_bytes()
    with pytest.raises(ValueError, match="not an Ed25519 peer ID"):
        PeerID(good[:-1])
    with pytest.raises(ValueError, match="not an Ed25519 peer ID"):
        PeerID(good + b"\0")
    with pytest.raises(ValueError, match="not an Ed25519 peer ID"):
        PeerID(b"\x01" + good[1:])  # wrong multihash code
    with pytest.raises(ValueError, match="not an Ed25519 peer ID"):
        PeerID(good[:3] + b"\x02" + good[4:])  # key type secp256k1, not Ed25519


# ---- signatures -----------------------------------------------------------------------------


def test_signature_verifies_and_tampering_is_detected() -> None:
    identity = Identity.generate()
    message = b"hive-handshake-v1 nonce and peer ids"
    signature = identity.sign(message)
    identity.peer_id.verify(signature, message)  # does not raise

    with pytest.raises(HandshakeError, match=identity.peer_id.to_base58()):
        identity.peer_id.verify(signature, message + b"!")
    with pytest.raises(HandshakeError):
        identity.peer_id.verify(signature, b"H" + message[1:])
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    with pytest.raises(HandshakeError, match="does not verify"):
        identity.peer_id.verify(flipped, message)


def test_signature_from_another_key_is_rejected() -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    message = b"I am alice"
    with pytest.raises(HandshakeError, match="does not verify"):
        alice.peer_id.verify(mallory.sign(message), message)


def test_public_key_recovered_from_peer_id_alone() -> None:
    identity = Identity.generate()
    stranger_view = PeerID.from_base58(identity.peer_id.to_base58())
    stranger_view.verify(identity.sign(b"hello"), b"hello")


# ---- key files ------------------------------------------------------------------------------


def test_load_or_create_persists_the_same_identity(tmp_path) -> None:
    path = tmp_path / "keys" / "nested" / "identity.pem"  # parent folders are created
    first = Identity.load_or_create(path)
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = Identity.load_or_create(path)
    third = Identity.load_or_create(str(path))
    assert second.peer_id == first.peer_id == third.peer_id
    # it is the same private key, not only the same public one
    second.peer_id.verify(first.sign(b"x"), b"x")
    first.peer_id.verify(third.sign(b"y"), b"y")
    # loading does not rewrite the file or loosen its mode
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in path.read_bytes()


def test_load_or_create_file_is_0600_even_with_a_permissive_umask(tmp_path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "identity.pem"
        Identity.load_or_create(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_distinct_files_give_distinct_identities(tmp_path) -> None:
    a = Identity.load_or_create(tmp_path / "a.pem")
    b = Identity.load_or_create(tmp_path / "b.pem")
    assert a.peer_id != b.peer_id


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a key at all\n",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        os.urandom(64),
    ],
    ids=["empty", "text", "bad-pem", "random-bytes"],
)
def test_garbage_identity_file_is_a_config_error_naming_the_path(tmp_path, content: bytes) -> None:
    path = tmp_path / "identity.pem"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        Identity.load_or_create(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == content  # a bad file is never overwritten


def test_non_ed25519_key_file_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "ec.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(ConfigError, match="not an Ed25519 key") as info:
        Identity.load_or_create(path)
    assert str(path) in str(info.value)


def test_encrypted_key_file_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "encrypted.pem"
    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError) as info:
        Identity.load_or_create(path)
    assert str(path) in str(info.value)


def test_identity_path_that_is_a_directory_is_a_config_error(tmp_path) -> None:
    """The path exists but holds no key: the documented ConfigError, not a raw OSError."""
    path = tmp_path / "identity.pem"
    path.mkdir()
    with pytest.raises(ConfigError) as info:
        Identity.load_or_create(path)
    assert str(path) in str(info.value)


# ---- base58 ---------------------------------------------------------------------------------

# Vectors from Bitcoin Core's base58_encode_decode.json
B58_VECTORS = [
    ("", ""),
    ("61", "2g"),
    ("626262", "a3gV"),
    ("636363", "aPEr"),
    ("73696d706c792061206c6f6e6720737472696e67", "2cFupjhnEsSn59qHXstmK2ffpLv2"),
    ("00eb15231dfceb60925886b67d065299925915aeb172c06647", "1NS17iag9jJgTHD1VXjvLCEnZuQ3rJDE9L"),
    ("516b6fcd0f", "ABnLTmg"),
    ("bf4f89001e670274dd", "3SEo3LWLoPntC"),
    ("572e4794", "3EFU7m"),
    ("ecac89cad93923c02321", "EJDM8drfXA6uyA"),
    ("10c8511e", "Rt5zm"),
    ("00000000000000000000", "1111111111"),
]


@pytest.mark.parametrize(("hex_data", "text"), B58_VECTORS)
def test_b58_known_vectors(hex_data: str, text: str) -> None:
    assert b58encode(bytes.fromhex(hex_data)) == text
    assert b58decode(text) == bytes.fromhex(hex_data)


@pytest.mark.parametrize(
    "data",
    [b"\0", b"\0\0\0", b"\0\x01", b"\0\0\xff\xff", b"\0" * 5 + b"\x00\x01\x00", b"\x01\0\0", b"\xff" * 40],
)
def test_b58_round_trip_keeps_leading_zero_bytes(data: bytes) -> None:
    text = b58encode(data)
    leading_zeros = len(data) - len(data.lstrip(b"\0"))
    assert text.startswith("1" * leading_zeros)
    assert not text[leading_zeros:].startswith("1")
    assert b58decode(text) == data


def test_b58_round_trip_random() -> None:
    rng = random.Random(1234)
    for _ in range(500):
        zeros = rng.choice([0, 0, 1, 2, 5])
        data = b"\0" * zeros + rng.randbytes(rng.randrange(0, 64))
        text = b58encode(data)
        assert set(text) <= set("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")
        assert b58decode(text) == data


@pytest.mark.parametrize("bad", ["0", "O", "I", "l", "+", "abc/", "é"])
def test_b58decode_names_the_bad_character(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        b58decode("2g" + bad)
    assert repr(bad[-1]) in str(info.value)


def test_peer_ids_are_totally_ordered():
    # matchmaking sorts (expiration, peer id) tuples: equal expirations compare the ids with >= and <=
    a, b = sorted([Identity.generate().peer_id, Identity.generate().peer_id])
    assert a < b and a <= b and b > a and b >= a and a >= a and not a > a
    assert (1.0, a) < (1.0, b) and (1.0, b) >= (1.0, a)
