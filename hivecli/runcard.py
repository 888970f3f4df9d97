"""A run's identity: the recipe, signed by the peer that started the run.

A run card binds a run's prefix, its run id and its recipe to the key of the peer that
started it (the run's owner). Every peer of the run republishes the card as it got it, so the
run outlives its starter, and nobody without the owner's key can change a byte of it: a
stranger may publish a card of its own for the same prefix, but a joiner that knows the
owner (from the `hive join ... --run PREFIX@OWNER` line the starter printed) refuses it, and
one that does not know the owner refuses to choose between two owners.

The card carries the recipe as msgpack bytes, and the signature covers those exact bytes:
what the joiner verifies is what it decodes, with no re-encoding in between.

Keys that act on the joiner's own machine (where it writes, what it reads, how it listens)
are never taken from a card, even a validly signed one: see `LOCAL_KEYS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hivecli._exceptions import ConfigError
from hivecli.net.framing import pack, unpack
from hivecli.net.identity import PeerID

_TAG = b"hive-run-card-v1"
MAX_RECIPE_BYTES = 64 * 1024

# section -> keys that only the local machine decides (None: the whole section)
# output.tensorboard too: whether this machine writes event files (and has the package) is its own choice
LOCAL_KEYS: dict[str, set[str] | None] = {
    "network": None,
    "output": {"dir", "tensorboard"},
    "data": {"root", "workers"},
}


def without_local_keys(recipe: dict[str, Any]) -> dict[str, Any]:
    """A copy of `recipe` without the keys that act on the machine that runs it (LOCAL_KEYS)."""
    shared: dict[str, Any] = {}
    for section, values in recipe.items():
        local = LOCAL_KEYS.get(section, set())
        if local is None:
            continue
        shared[section] = {k: v for k, v in values.items() if k not in local} if isinstance(values, dict) else values
    return shared


def _signed_message(prefix: str, run_id: str, owner: PeerID, recipe_bytes: bytes) -> bytes:
    return _TAG + pack([prefix, run_id, owner.to_bytes(), recipe_bytes])


@dataclass(frozen=True)
class RunCard:
    """A run's prefix, id and recipe, signed by its owner. Build with `create` or `from_wire`."""

    prefix: str
    run_id: str
    owner: PeerID
    recipe_bytes: bytes
    signature: bytes

    @classmethod
    def create(
        cls, prefix: str, run_id: str, owner: PeerID, recipe: dict[str, Any], sign: Callable[[bytes], bytes]
    ) -> RunCard:
        """Sign a new card; `sign` is the owner's key (Identity.sign). Local keys are left out.

        Raises:
            ConfigError: the recipe does not fit in a card (over MAX_RECIPE_BYTES).
        """
        recipe_bytes = pack(without_local_keys(recipe))
        if len(recipe_bytes) > MAX_RECIPE_BYTES:
            raise ConfigError(
                f"the recipe of run {prefix!r} takes {len(recipe_bytes)} bytes, over the {MAX_RECIPE_BYTES} a run "
                f"can publish; shorten it (long lists in the recipe?)"
            )
        signature = sign(_signed_message(prefix, run_id, owner, recipe_bytes))
        return cls(prefix, run_id, owner, recipe_bytes, signature)

    @classmethod
    def from_wire(cls, raw: Any) -> RunCard:
        """Parse and verify a card that came from the network.

        Raises:
            ValueError: malformed, too large, or the signature is not the owner's (the message says which).
        """
        if not isinstance(raw, dict):
            raise ValueError("a run card must be a map")
        prefix, run_id, owner, recipe_bytes, signature = (
            raw.get(k) for k in ("prefix", "run_id", "owner", "recipe", "signature")
        )
        if not (isinstance(prefix, str) and isinstance(run_id, str) and isinstance(owner, str)):
            raise ValueError("a run card's prefix, run_id and owner must be strings")
        if not isinstance(recipe_bytes, bytes) or not isinstance(signature, bytes):
            raise ValueError("a run card's recipe and signature must be bytes")
        if len(recipe_bytes) > MAX_RECIPE_BYTES or len(prefix) > 64 or len(run_id) > 64:
            raise ValueError("a run card is larger than allowed")
        owner_id = PeerID.from_base58(owner)  # raises ValueError
        try:
            owner_id.verify(signature, _signed_message(prefix, run_id, owner_id, recipe_bytes))
        except Exception:
            raise ValueError(f"the run card of {prefix!r} is not signed by the owner it names ({owner})") from None
        card = cls(prefix, run_id, owner_id, recipe_bytes, signature)
        if not isinstance(card.recipe, dict):
            raise ValueError("a run card's recipe is not a map")
        return card

    def to_wire(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "run_id": self.run_id,
            "owner": self.owner.to_base58(),
            "recipe": self.recipe_bytes,
            "signature": self.signature,
        }

    @property
    def recipe(self) -> dict[str, Any]:
        """The run's recipe, without the keys that only the local machine decides."""
        try:
            data = unpack(self.recipe_bytes)
        except Exception:
            return {}
        return without_local_keys(data) if isinstance(data, dict) else {}

    @property
    def address(self) -> str:
        """What names this run for `--run`: PREFIX@OWNER."""
        return f"{self.prefix}@{self.owner.to_base58()}"


def parse_run_ref(text: str, where: str = "--run") -> tuple[str, PeerID | None]:
    """Split `PREFIX` or `PREFIX@OWNER` (what `hive start` prints) into (prefix, owner or None).

    Raises:
        ConfigError: the owner part is not a peer ID (the message names `where`).
    """
    prefix, at, owner_text = text.rpartition("@")
    if not at:
        return text, None
    if not prefix:
        raise ConfigError(f"{where} {text!r}: the run's prefix is missing before '@'; write PREFIX@OWNER")
    try:
        return prefix, PeerID.from_base58(owner_text)
    except ValueError:
        raise ConfigError(
            f"{where} {text!r}: {owner_text!r} after '@' is not a peer ID; copy the --run value `hive start` printed"
        ) from None
