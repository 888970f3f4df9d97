"""What a group is: its id and its members, in the order that assigns each one its part.

Both travel as plain msgpack lists; `from_wire` validates everything a peer sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hivecli.averaging.link import RoundPlan
from hivecli.net.identity import PeerID
from hivecli.net.multiaddr import Multiaddr


def method_name(method: str, prefix: str) -> str:
    """The name under which the averager of `prefix` serves `method`: a host may run several
    averagers (hivecli.Optimizer averages gradients and parameters apart), each with its own."""
    return f"{method}/{prefix}"


@dataclass(frozen=True)
class Member:
    """One peer of a group.

    Attributes:
        peer_id: who it is.
        addrs: where it listens (empty for a client behind NAT: others never dial it).
        client_mode: it sends its tensors but reduces no part of them.
        bandwidth: relative share of the work it takes (None: an equal share).
        gathered: whatever it passed as `step(gather=...)`.
    """

    peer_id: PeerID
    addrs: tuple[str, ...]
    client_mode: bool
    bandwidth: float | None
    gathered: Any = None

    def to_wire(self) -> list[Any]:
        return [self.peer_id.to_base58(), list(self.addrs), self.client_mode, self.bandwidth, self.gathered]

    @classmethod
    def from_wire(cls, data: Any) -> Member:
        """Raises ValueError if `data` is not a member description."""
        if not isinstance(data, list) or len(data) != 5:
            raise ValueError(f"member description {str(data)[:80]!r} is not [peer_id, addrs, client, bandwidth, data]")
        peer, addrs, client_mode, bandwidth, gathered = data
        if not isinstance(peer, str) or not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
            raise ValueError("member peer_id must be a string and addrs a list of strings")
        if not isinstance(client_mode, bool) or not (bandwidth is None or isinstance(bandwidth, (int, float))):
            raise ValueError("member client_mode must be a bool and bandwidth a number or None")
        if bandwidth is not None and bandwidth < 0:
            raise ValueError(f"member bandwidth {bandwidth} is negative")
        return cls(PeerID.from_base58(peer), tuple(addrs[:16]), client_mode, bandwidth, gathered)

    def multiaddrs(self) -> list[Multiaddr]:
        parsed = []
        for text in self.addrs:
            try:
                parsed.append(Multiaddr.parse(text))
            except ValueError:
                continue
        return parsed


@dataclass(frozen=True)
class GroupInfo:
    """An assembled group: every member sees the same id, the same member order, and the plan
    its leader made for the round (chunk size, and codec with compression "auto"; link.py)."""

    group_id: bytes
    members: tuple[Member, ...]
    plan: RoundPlan = field(default_factory=RoundPlan)

    @property
    def peer_ids(self) -> list[PeerID]:
        return [m.peer_id for m in self.members]

    def index_of(self, peer_id: PeerID) -> int:
        return self.peer_ids.index(peer_id)

    def to_wire(self) -> list[Any]:
        return [self.group_id, [m.to_wire() for m in self.members], self.plan.to_wire()]

    @classmethod
    def from_wire(cls, data: Any) -> GroupInfo:
        """Raises ValueError if `data` is not a group description."""
        if not (isinstance(data, list) and len(data) in (2, 3) and isinstance(data[0], bytes) and len(data[0]) == 20):
            raise ValueError("group description must be [20-byte group id, members, plan]")
        plan = RoundPlan.from_wire(data[2]) if len(data) == 3 else RoundPlan()
        if not isinstance(data[1], list) or not 1 <= len(data[1]) <= 4096:
            raise ValueError("group members must be a non-empty list")
        members = tuple(Member.from_wire(m) for m in data[1])
        if len({m.peer_id for m in members}) != len(members):
            raise ValueError("a peer appears twice in the group")
        return cls(data[0], members, plan)
