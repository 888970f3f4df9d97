"""The connection handshake: both sides prove they hold the key of the peer ID they claim.

1. Each side sends HELLO {protocol, version, peer_id, nonce (32 random bytes), listen maddrs}.
2. Each side checks the protocol name and version, and the dialer checks that the peer ID is
   the one it dialed (`/p2p/X` reaching someone else fails here).
3. Each side sends AUTH {signature}: its key signs (domain tag, the other side's nonce, both
   peer IDs). A fresh nonce per connection means a recorded AUTH cannot be replayed.

Traffic after the handshake is authenticated at connection level but not encrypted.
"""

from __future__ import annotations

import os
from typing import Any

from hivecli._exceptions import HandshakeError, MultiaddrError, ProtocolError
from hivecli.net.framing import FrameLimits, encode_frame, read_frame
from hivecli.net.identity import Identity, PeerID
from hivecli.net.multiaddr import Multiaddr
from hivecli.net.transport import ByteStream

PROTOCOL_NAME = "hive"
PROTOCOL_VERSION = 1
_AUTH_TAG = b"hive-handshake-v1"
_HANDSHAKE_LIMITS = FrameLimits(max_header_bytes=64 * 1024, max_body_bytes=0)
_MAX_LISTEN_ADDRS = 32


def _auth_message(nonce: bytes, signer: PeerID, verifier: PeerID) -> bytes:
    return _AUTH_TAG + nonce + signer.to_bytes() + verifier.to_bytes()


async def _read(stream: ByteStream, where: str) -> dict[str, Any]:
    try:
        message, _ = await read_frame(stream, _HANDSHAKE_LIMITS)
    except ProtocolError as e:
        raise HandshakeError(f"{where} is not a hive peer (its first bytes are not a hive handshake: {e})") from None
    if not isinstance(message, dict):
        raise HandshakeError(f"{where} sent a handshake message that is not a map")
    return message


async def perform_handshake(
    stream: ByteStream,
    identity: Identity,
    listen_maddrs: list[Multiaddr],
    expected_peer: PeerID | None,
    where: str,
) -> tuple[PeerID, list[Multiaddr]]:
    """Authenticate both ends of a fresh stream; the caller bounds it with a timeout.

    Args:
        expected_peer: the peer ID we dialed, or None when accepting.
        where: how to name the other end in errors, e.g. "127.0.0.1:4001".

    Returns:
        The remote peer ID and the addresses it says it listens on.

    Raises:
        HandshakeError: not a hive peer, wrong version, wrong peer ID or a bad signature.
        asyncio.IncompleteReadError, ConnectionError: the stream ended during the handshake.
    """
    nonce = os.urandom(32)
    hello = {
        "protocol": PROTOCOL_NAME,
        "version": PROTOCOL_VERSION,
        "peer_id": identity.peer_id.to_bytes(),
        "nonce": nonce,
        "listen": [m.transport_address for m in listen_maddrs[:_MAX_LISTEN_ADDRS]],
    }
    for chunk in encode_frame(hello):
        stream.write(chunk)
    await stream.drain()

    theirs = await _read(stream, where)
    if theirs.get("protocol") != PROTOCOL_NAME:
        raise HandshakeError(f"{where} is not a hive peer (protocol {theirs.get('protocol')!r})")
    if theirs.get("version") != PROTOCOL_VERSION:
        raise HandshakeError(
            f"{where} speaks hive wire protocol v{theirs.get('version')}, this node speaks "
            f"v{PROTOCOL_VERSION}; upgrade hivecli on the older peer"
        )
    their_nonce = theirs.get("nonce")
    if not isinstance(their_nonce, bytes) or len(their_nonce) != 32:
        raise HandshakeError(f"{where} sent a handshake without a 32-byte nonce")
    raw_peer_id, raw_listen = theirs.get("peer_id"), theirs.get("listen", [])
    if not isinstance(raw_peer_id, bytes) or not isinstance(raw_listen, list):
        raise HandshakeError(f"{where} sent a handshake with a non-bytes peer_id or a non-list listen field")
    try:
        remote_peer = PeerID(raw_peer_id)
    except ValueError as e:
        raise HandshakeError(f"{where} sent an invalid peer ID: {e}") from None
    if expected_peer is not None and remote_peer != expected_peer:
        raise HandshakeError(
            f"{where} is peer {remote_peer}, not {expected_peer} as the address says; "
            f"the address is stale or someone else listens there"
        )
    listen: list[Multiaddr] = []
    for text in raw_listen:
        try:
            listen.append(Multiaddr.parse(text).with_peer_id(remote_peer))
        except MultiaddrError:
            continue  # a bad announced address is the announcer's problem; skip it
        if len(listen) >= _MAX_LISTEN_ADDRS:
            break

    signature = identity.sign(_auth_message(their_nonce, identity.peer_id, remote_peer))
    for chunk in encode_frame({"signature": signature}):
        stream.write(chunk)
    await stream.drain()

    auth = await _read(stream, where)
    their_signature = auth.get("signature")
    if not isinstance(their_signature, bytes):
        raise HandshakeError(f"{where} sent no signature in its handshake")
    try:
        remote_peer.verify(their_signature, _auth_message(nonce, remote_peer, identity.peer_id))
    except HandshakeError:
        raise HandshakeError(f"{where} claims to be {remote_peer} but cannot prove it holds that peer's key") from None
    return remote_peer, listen
