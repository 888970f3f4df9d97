"""What `hive monitor` remembers of the runs it watches: a pure data structure, no I/O.

Every few seconds the collector hands `RunHistory.update` the records the run's peers published
in the DHT (hivecli.runs.run_views). Each record adds a point to that peer's curve when its
report is new; a peer's own whole-run curve (the "curve" field, hivecli.progress.Curve) fills
in what happened before the monitor started. Every update also adds a point to the run's
curve: its live peers, their summed samples/s and their mean loss and accuracy.

Records are written by strangers: every field is checked (type, finiteness, range, length)
before it is kept, and the number of peers and points is bounded, so a hostile peer can cost
only its own row.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hivecli.utils.values import finite

MAX_PEERS = 256  # per run; beyond, the peers silent the longest are forgotten
MAX_POINTS = 4000  # per curve: a point every 2 s for over two hours, then the oldest go
MAX_ROUNDS = 200  # averaging rounds kept per run (the latest)
LIVE_SECONDS = 30.0  # a peer whose last report is older is shown as gone


def count(value: Any) -> int | None:
    """`value` if it is a non-negative int (not a bool) below 2**63, else None."""
    return value if type(value) is int and 0 <= value < 2**63 else None


def text(value: Any, limit: int = 64) -> str | None:
    """`value` if it is a string of at most `limit` characters, else None."""
    return value if isinstance(value, str) and len(value) <= limit else None


@dataclass
class PeerView:
    """One peer of a run: its latest checked record and its curve [(time, step, loss, acc, samples/s)]."""

    peer_id: str
    latest: dict[str, Any] = field(default_factory=dict)
    curve: deque[tuple[float, int, float | None, float | None, float | None]] = field(
        default_factory=lambda: deque(maxlen=MAX_POINTS)
    )
    reported: float = -math.inf  # the DHT time of its latest report


def check_record(record: dict[str, Any]) -> dict[str, Any]:
    """The fields of a progress record the dashboard shows, each checked; missing or bad ones are None."""
    rounds = record.get("recent_rounds")
    return {
        "step": count(record.get("step")),
        "loss": finite(record.get("loss")),
        "accuracy": finite(record.get("accuracy"), 0.0, 1.0),
        "samples_per_s": finite(record.get("samples_per_s"), 0.0, 1e9),
        "samples": count(record.get("samples")),
        "run_samples": count(record.get("run_samples")),
        "goal_samples": count(record.get("goal_samples")),
        "eta_s": finite(record.get("eta_s"), 0.0),
        "rounds": count(record.get("rounds")),
        "group_size": count(record.get("group_size")),
        "bytes_sent": count(record.get("bytes_sent")),
        "bytes_received": count(record.get("bytes_received")),
        "pace_mbps": finite(record.get("pace_mbps"), 0.0, 1e6),
        "reach": text(record.get("reach"), 16),
        "time": finite(record.get("time"), 0.0),
        "recent_rounds": _check_rounds(rounds) if isinstance(rounds, list) else [],
    }


def _check_rounds(rounds: list[Any]) -> list[tuple[float, int, float, bool]]:
    checked = []
    for entry in rounds[-32:]:
        if isinstance(entry, (list, tuple)) and len(entry) == 4 and isinstance(entry[3], bool):
            when, size, seconds = finite(entry[0], 0.0), count(entry[1]), finite(entry[2], 0.0, 86400.0)
            if when is not None and size is not None and size <= 4096 and seconds is not None:
                checked.append((when, size, seconds, entry[3]))
    return checked


def _check_curve(points: Any) -> list[tuple[float, int, float | None, float | None, float | None]]:
    if not isinstance(points, list):
        return []
    checked = []
    for p in points[-1024:]:
        if isinstance(p, (list, tuple)) and len(p) == 5:
            when, step = finite(p[0], 0.0), count(p[1])
            if when is not None and step is not None:
                checked.append((when, step, finite(p[2]), finite(p[3], 0.0, 1.0), finite(p[4], 0.0, 1e9)))
    return sorted(checked)


class RunHistory:
    """One run as the monitor has seen it: its peers, their curves, the run's curve, its rounds."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.summary: dict[str, Any] = {}
        self.epoch: dict[str, Any] | None = None
        self.peers: dict[str, PeerView] = {}
        self.run_curve: deque[tuple[float, int, float | None, float | None, float | None]] = deque(
            maxlen=MAX_POINTS
        )  # (time, live peers, mean loss, mean accuracy, summed samples/s)
        self.rounds: deque[tuple[float, str, int, float, bool]] = deque(maxlen=MAX_ROUNDS)  # + the peer id

    def update(self, view: dict[str, Any], now: float) -> None:
        """Take in one `run_views` entry ({"summary", "peers", "epoch"}) read at DHT time `now`."""
        summary = view.get("summary")
        if isinstance(summary, dict):
            self.summary = {
                k: summary.get(k) for k in ("model", "dataset", "owner", "run_id") if text(summary.get(k), 128)
            }
            size = count(summary.get("target_group_size"))
            if size is not None:
                self.summary["target_group_size"] = size
        self.epoch = view.get("epoch") if isinstance(view.get("epoch"), dict) else None
        records = view.get("peers") if isinstance(view.get("peers"), dict) else {}
        for peer_id, record in records.items():
            if isinstance(peer_id, str) and len(peer_id) <= 128 and isinstance(record, dict):
                self._take(peer_id, record)
        self._forget_extra_peers()
        live = [p.latest for p in self.live_peers(now)]
        losses = [r["loss"] for r in live if r["loss"] is not None]
        accuracies = [r["accuracy"] for r in live if r["accuracy"] is not None]
        self.run_curve.append(
            (
                now,
                len(live),
                sum(losses) / len(losses) if losses else None,
                sum(accuracies) / len(accuracies) if accuracies else None,
                sum(r["samples_per_s"] or 0.0 for r in live),
            )
        )

    def _take(self, peer_id: str, record: dict[str, Any]) -> None:
        checked = check_record(record)
        stamp = checked["time"]
        if stamp is None:
            return
        peer = self.peers.get(peer_id)
        if peer is None:
            peer = self.peers[peer_id] = PeerView(peer_id)
            for point in _check_curve(record.get("curve")):  # what happened before we watched
                if point[0] < stamp:
                    peer.curve.append(point)
        if stamp <= peer.reported:
            return  # the same report as last time, or an older one
        peer.reported, peer.latest = stamp, checked
        if checked["step"] is not None:
            point = (stamp, checked["step"], checked["loss"], checked["accuracy"], checked["samples_per_s"])
            if not peer.curve or point[0] > peer.curve[-1][0]:
                peer.curve.append(point)
        known = {(r[0], r[1]) for r in self.rounds}
        for when, size, seconds, ok in checked["recent_rounds"]:
            if (when, peer_id) not in known:
                self.rounds.append((when, peer_id, size, seconds, ok))
        if len(self.rounds) > 1 and self.rounds[-1][0] < self.rounds[-2][0]:
            self.rounds = deque(sorted(self.rounds), maxlen=MAX_ROUNDS)

    def _forget_extra_peers(self) -> None:
        if len(self.peers) > MAX_PEERS:
            keep = sorted(self.peers.values(), key=lambda p: p.reported)[-MAX_PEERS:]
            self.peers = {p.peer_id: p for p in keep}

    def live_peers(self, now: float) -> list[PeerView]:
        return [p for p in self.peers.values() if now - p.reported <= LIVE_SECONDS]

    def snapshot(self, now: float, since: float = -math.inf) -> dict[str, Any]:
        """The run as JSON-ready data: every peer's latest record, and the points of each curve
        and the rounds newer than `since` (the browser asks for what it does not have yet)."""
        return {
            "prefix": self.prefix,
            "summary": self.summary,
            "epoch": self.epoch,
            "peers": {
                p.peer_id: {
                    **{k: v for k, v in p.latest.items() if k != "recent_rounds"},
                    "live": now - p.reported <= LIVE_SECONDS,
                    "last_report_s": round(max(0.0, now - p.reported), 1),
                    "curve": [list(point) for point in p.curve if point[0] > since],
                }
                for p in self.peers.values()
            },
            "run_curve": [list(point) for point in self.run_curve if point[0] > since],
            "rounds": [list(r) for r in self.rounds if r[0] > since],
        }

    def curves(self) -> dict[str, list[tuple[float, int, dict[str, Any]]]]:
        """Every peer's curve as (wall time, step, fields), for hivecli.tblogs.export_curves."""
        return {
            p.peer_id: [
                (when, step, {"loss": loss, "accuracy": acc, "samples_per_s": speed})
                for when, step, loss, acc, speed in p.curve
            ]
            for p in self.peers.values()
        }
