"""The connection handshake (wire protocol v2): both sides prove who they are and agree on keys.

1. Each side sends HELLO {protocol, version, peer_id, nonce (32 random bytes), ephemeral (a fresh
   X25519 public key), encrypt (bool), private (bool: it holds a swarm key), same_host (bool: it
   sees both ends of this TCP connection on its own host and lets such a link go unsealed,
   SecuritySettings.encrypt_same_host; older peers leave the field out)}.
2. Each side checks the protocol name and version, the types of every field, that the peer ID
   is the one it dialed (`/p2p/X` reaching someone else fails here), and that the two settings
   agree: encryption is off only when both turned it off, and both or neither hold a swarm key.
3. Both compute the transcript hash: SHA-256 over both HELLOs' nonces, peer IDs, ephemeral keys
   and flags, in nonce order so both sides get the same bytes. The two same_host flags count
   only when both HELLOs carry one (a peer that predates them hashes without them); the AUTH
   signatures then cover them, so no one on the path can flip one.
4. Private swarms only: each side sends PROOF {swarm_proof: HMAC-SHA256(swarm key, transcript,
   own peer ID)} and checks the other's before sending anything more. A peer without the key
   learns no more than the HELLO told it.
5. Each side sends AUTH {signature, listen}: its Ed25519 key signs the transcript, its own peer
   ID and its listen addresses. Signing the ephemeral keys binds the key exchange to both
   identities, so a man in the middle cannot substitute its own; fresh nonces and ephemeral
   keys mean a recorded AUTH cannot be replayed.
6. Session keys: HKDF-SHA256 over the X25519 shared secret, salt = the swarm key (32 zero bytes
   in the public swarm), info = the transcript; one key per direction. All later traffic goes
   through `SecureStream`, unless both sides turned encryption off, or both HELLOs said
   same_host: then the link's bytes never leave the kernel of the one host both ends run on.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hivecli._exceptions import HandshakeError, MultiaddrError, ProtocolError
from hivecli.net.framing import FrameLimits, encode_frame, read_frame
from hivecli.net.identity import Identity, PeerID
from hivecli.net.multiaddr import Multiaddr
from hivecli.net.secure import KEY_BYTES, SecureStream, SecuritySettings, swarm_key_fingerprint
from hivecli.net.transport import ByteStream

PROTOCOL_NAME = "hive"
PROTOCOL_VERSION = 2
# Domain tags: a signature, MAC or key made for one purpose can never pass as another.
_TRANSCRIPT_TAG = b"hive-handshake-v2/transcript"
_AUTH_TAG = b"hive-handshake-v2/auth"
_PROOF_TAG = b"hive-handshake-v2/swarm-proof"
_KEYS_TAG = b"hive-handshake-v2/session-keys"
HANDSHAKE_LIMITS = FrameLimits(max_header_bytes=64 * 1024, max_body_bytes=0)
_MAX_LISTEN_ADDRS = 32
_NONCE_BYTES = 32
_EPHEMERAL_BYTES = 32
_PUBLIC_SWARM_SALT = bytes(32)


class HandshakeResult(NamedTuple):
    """What a completed handshake established.

    Attributes:
        remote_peer: the peer ID the other side proved it holds the key of.
        listen: the addresses it says it listens on (signed by it, each with /p2p/remote_peer).
        stream: the stream to use from now on: a `SecureStream` over the handshake's stream, or
            that stream itself when both sides turned encryption off or both ends are on one
            host (its `sealed` says which).
    """

    remote_peer: PeerID
    listen: list[Multiaddr]
    stream: ByteStream


@dataclass(frozen=True)
class _Hello:
    """The fields of a HELLO that the transcript covers, checked and typed."""

    peer_id: PeerID
    nonce: bytes
    ephemeral: bytes
    encrypt: bool
    private: bool
    same_host: bool | None  # None: the peer predates the field

    def message(self) -> dict[str, Any]:
        message = {
            "protocol": PROTOCOL_NAME,
            "version": PROTOCOL_VERSION,
            "peer_id": self.peer_id.to_bytes(),
            "nonce": self.nonce,
            "ephemeral": self.ephemeral,
            "encrypt": self.encrypt,
            "private": self.private,
        }
        if self.same_host is not None:
            message["same_host"] = self.same_host
        return message

    def transcript_part(self) -> bytes:
        # every field has a fixed length, so plain concatenation is unambiguous
        return self.nonce + self.peer_id.to_bytes() + self.ephemeral + bytes([self.encrypt, self.private])


def _short(value: Any) -> str:
    """repr() of a value from the network, cut so that a hostile one cannot flood the logs."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _transcript(ours: _Hello, theirs: _Hello) -> bytes:
    first, second = sorted((ours, theirs), key=lambda hello: hello.nonce)
    flags = b""
    if first.same_host is not None and second.same_host is not None:
        flags = bytes([first.same_host, second.same_host])
    return hashlib.sha256(_TRANSCRIPT_TAG + first.transcript_part() + second.transcript_part() + flags).digest()


def _listen_digest(listen: list[str]) -> bytes:
    """A hash of the listen list that does not depend on how msgpack encoded it."""
    digest = hashlib.sha256()
    for text in listen:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(4, "big") + data)
    return digest.digest()


def _auth_message(transcript: bytes, signer: PeerID, listen: list[str]) -> bytes:
    return _AUTH_TAG + transcript + signer.to_bytes() + _listen_digest(listen)


def _swarm_proof(swarm_key: bytes, transcript: bytes, prover: PeerID) -> bytes:
    # the prover's ID makes the two proofs differ: echoing ours back proves nothing
    return hmac.new(swarm_key, _PROOF_TAG + transcript + prover.to_bytes(), hashlib.sha256).digest()


def _session_keys(shared: bytes, swarm_key: bytes | None, transcript: bytes, we_are_first: bool) -> tuple[bytes, bytes]:
    """(send key, receive key). The side whose nonce sorts first sends with the first key."""
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=2 * KEY_BYTES,
        salt=swarm_key if swarm_key is not None else _PUBLIC_SWARM_SALT,
        info=_KEYS_TAG + transcript,
    ).derive(shared)
    first, second = okm[:KEY_BYTES], okm[KEY_BYTES:]
    return (first, second) if we_are_first else (second, first)


async def _send(stream: ByteStream, message: dict[str, Any]) -> None:
    """Write one handshake message. Raises ConnectionError if the stream is closed."""
    for chunk in encode_frame(message):
        stream.write(chunk)
    await stream.drain()


async def _read(stream: ByteStream, where: str, what: str) -> dict[str, Any]:
    """Read one handshake message (`what` names it in errors).

    Raises:
        HandshakeError: the bytes are not a handshake frame holding a map.
        asyncio.IncompleteReadError, ConnectionError: the stream ended.
    """
    try:
        message, _ = await read_frame(stream, HANDSHAKE_LIMITS)
    except ProtocolError as e:
        if what == "HELLO":
            raise HandshakeError(
                f"{where} is not a hive peer (its first bytes are not a hive handshake: {e})"
            ) from None
        raise HandshakeError(f"{where} sent a broken handshake {what} message: {e}") from None
    if not isinstance(message, dict):
        raise HandshakeError(f"{where} sent a handshake {what} message that is not a map")
    return message


class Diverted(Exception):
    """The other side's first frame asked for something other than a connection, and the
    `divert` callback of `perform_handshake` took the stream."""


def _parse_hello(message: dict[str, Any], where: str) -> _Hello:
    """Check a HELLO field by field. Raises HandshakeError naming the first bad field."""
    if message.get("protocol") != PROTOCOL_NAME:
        raise HandshakeError(f"{where} is not a hive peer (protocol {_short(message.get('protocol'))})")
    version = message.get("version")
    if type(version) is not int:
        raise HandshakeError(f"{where} sent a handshake without a valid protocol version ({_short(version)})")
    if version != PROTOCOL_VERSION:
        older = "that peer" if version < PROTOCOL_VERSION else "this node"
        raise HandshakeError(
            f"{where} speaks hive wire protocol v{version}, this node speaks v{PROTOCOL_VERSION}; "
            f"upgrade hivecli on {older}"
        )
    nonce, ephemeral = message.get("nonce"), message.get("ephemeral")
    if not isinstance(nonce, bytes) or len(nonce) != _NONCE_BYTES:
        raise HandshakeError(f"{where} sent a handshake without a {_NONCE_BYTES}-byte nonce")
    if not isinstance(ephemeral, bytes) or len(ephemeral) != _EPHEMERAL_BYTES:
        raise HandshakeError(f"{where} sent a handshake without a {_EPHEMERAL_BYTES}-byte ephemeral key")
    encrypt, private = message.get("encrypt"), message.get("private")
    same_host = message.get("same_host")
    if (
        type(encrypt) is not bool
        or type(private) is not bool
        or (same_host is not None and type(same_host) is not bool)
    ):
        raise HandshakeError(f"{where} sent a handshake whose encrypt, private or same_host field is not a boolean")
    raw_peer_id = message.get("peer_id")
    if not isinstance(raw_peer_id, bytes):
        raise HandshakeError(f"{where} sent a handshake with a non-bytes peer_id")
    try:
        peer_id = PeerID(raw_peer_id)
    except ValueError as e:
        raise HandshakeError(f"{where} sent an invalid peer ID: {e}") from None
    return _Hello(peer_id, nonce, ephemeral, encrypt, private, same_host)


def _check_settings(ours: _Hello, theirs: _Hello, security: SecuritySettings, where: str) -> None:
    """Refuse a peer whose swarm membership or encryption setting does not match ours.

    Raises:
        HandshakeError: one holds a swarm key and the other not, or only one turned encryption off.
    """
    if security.swarm_key is not None and not theirs.private:
        raise HandshakeError(
            f"{where} holds no swarm key, but this node belongs to a private swarm (key fingerprint "
            f"{swarm_key_fingerprint(security.swarm_key)}) and only talks to peers holding its key; "
            f"give that peer the same swarm key file"
        )
    if theirs.private and not ours.private:
        raise HandshakeError(
            f"{where} belongs to a private swarm and only talks to peers holding its swarm key, which this "
            f"node does not have; start this node with that swarm's key file to join it"
        )
    if ours.encrypt and not theirs.encrypt:
        raise HandshakeError(
            f"{where} has encryption turned off, but this node requires encrypted links; turn encryption "
            f"back on at that peer (it may be off only when both ends turn it off)"
        )
    if theirs.encrypt and not ours.encrypt:
        raise HandshakeError(
            f"{where} requires encrypted links, but this node has encryption turned off; turn it back on "
            f"(encryption may be off only when both ends turn it off)"
        )


def _parse_listen(raw_listen: Any, remote_peer: PeerID, where: str) -> tuple[list[str], list[Multiaddr]]:
    """Check an AUTH's listen field: (the strings as sent, the usable addresses among them).

    Raises:
        HandshakeError: it is not a list of at most _MAX_LISTEN_ADDRS strings.
    """
    if not isinstance(raw_listen, list) or len(raw_listen) > _MAX_LISTEN_ADDRS:
        raise HandshakeError(f"{where} sent a listen field that is not a list of at most {_MAX_LISTEN_ADDRS} addresses")
    if not all(isinstance(text, str) for text in raw_listen):
        raise HandshakeError(f"{where} sent a listen address that is not a string")
    listen: list[Multiaddr] = []
    for text in raw_listen:
        try:
            listen.append(Multiaddr.parse(text).with_peer_id(remote_peer))
        except MultiaddrError:
            continue  # a bad announced address is the announcer's problem; skip it
    return raw_listen, listen


async def perform_handshake(
    stream: ByteStream,
    identity: Identity,
    listen_maddrs: list[Multiaddr],
    expected_peer: PeerID | None,
    where: str,
    security: SecuritySettings | None = None,
    divert: Callable[[dict[str, Any]], bool] | None = None,
) -> HandshakeResult:
    """Authenticate both ends of a fresh stream and set up its encryption; the caller bounds it
    with a timeout and closes the stream if it fails.

    Args:
        expected_peer: the peer ID we dialed, or None when accepting.
        where: how to name the other end in errors, e.g. "127.0.0.1:4001".
        security: encryption and swarm key; None means the defaults (encrypted, public swarm).
        divert: called with the other side's first frame, after ours went out; True means it
            asked for something other than a connection (a bulk link, bulk.py) and `divert`
            took the stream: the handshake stops with `Diverted`.

    Returns:
        The remote peer ID, the addresses it listens on and the stream to use from now on.

    Raises:
        Diverted: `divert` took the stream.
        HandshakeError: not a hive peer, wrong version, wrong peer ID, a bad signature, a swarm
            key or encryption setting that does not match ours, or a malformed field.
        asyncio.IncompleteReadError, ConnectionError: the stream ended during the handshake.
    """
    security = security if security is not None else SecuritySettings()
    ephemeral = X25519PrivateKey.generate()
    ours = _Hello(
        identity.peer_id,
        os.urandom(_NONCE_BYTES),
        ephemeral.public_key().public_bytes_raw(),
        security.encrypt,
        security.swarm_key is not None,
        security.encrypt and not security.encrypt_same_host and stream.same_host,
    )
    await _send(stream, ours.message())

    first = await _read(stream, where, "HELLO")
    if divert is not None and divert(first):
        raise Diverted()
    theirs = _parse_hello(first, where)
    remote_peer = theirs.peer_id
    if expected_peer is not None and remote_peer != expected_peer:
        raise HandshakeError(
            f"{where} is peer {remote_peer}, not {expected_peer} as the address says; "
            f"the address is stale or someone else listens there"
        )
    # Our own ID or nonce coming back is a reflection of our HELLO (or a second node started
    # with this node's identity file): either way there is no other peer to authenticate.
    if remote_peer == identity.peer_id or theirs.nonce == ours.nonce:
        raise HandshakeError(
            f"{where} uses this node's own peer ID {remote_peer}: it is this node itself, or another node "
            f"started with the same identity file; give each node its own identity file"
        )
    _check_settings(ours, theirs, security, where)
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(theirs.ephemeral))
    except ValueError:  # a low-order point: the shared secret would be all zeros
        raise HandshakeError(f"{where} sent an invalid ephemeral key") from None
    transcript = _transcript(ours, theirs)

    if security.swarm_key is not None:
        await _send(stream, {"swarm_proof": _swarm_proof(security.swarm_key, transcript, identity.peer_id)})
        their_proof = (await _read(stream, where, "PROOF")).get("swarm_proof")
        expected_proof = _swarm_proof(security.swarm_key, transcript, remote_peer)
        if not isinstance(their_proof, bytes) or not hmac.compare_digest(their_proof, expected_proof):
            raise HandshakeError(
                f"peer at {where} does not hold this swarm's key "
                f"(fingerprint {swarm_key_fingerprint(security.swarm_key)})"
            )

    our_listen = [m.transport_address for m in listen_maddrs[:_MAX_LISTEN_ADDRS]]
    signature = identity.sign(_auth_message(transcript, identity.peer_id, our_listen))
    await _send(stream, {"signature": signature, "listen": our_listen})

    auth = await _read(stream, where, "AUTH")
    their_signature = auth.get("signature")
    if not isinstance(their_signature, bytes):
        raise HandshakeError(f"{where} sent no signature in its handshake")
    raw_listen, listen = _parse_listen(auth.get("listen"), remote_peer, where)
    try:
        remote_peer.verify(their_signature, _auth_message(transcript, remote_peer, raw_listen))
    except HandshakeError:
        raise HandshakeError(f"{where} claims to be {remote_peer} but cannot prove it holds that peer's key") from None

    # In clear when both turned encryption off (_check_settings made sure it is both), or when
    # both ends are on this host and neither asked to seal such links.
    if not ours.encrypt or (ours.same_host and theirs.same_host):
        return HandshakeResult(remote_peer, listen, stream)
    send_key, receive_key = _session_keys(shared, security.swarm_key, transcript, ours.nonce < theirs.nonce)
    return HandshakeResult(remote_peer, listen, SecureStream(stream, send_key, receive_key))
