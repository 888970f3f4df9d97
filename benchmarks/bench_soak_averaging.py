"""Soak: DecentralizedAverager peers averaging round after round for a long time, with churn.

N peers (`python -m hivecli.netlab.peer`) on loopback average a tensor of --size float32s in
groups of up to N (at least 2), round after round, for --seconds. Every --churn-every seconds
one of peers 1..N-1 (in turn; peer 0 is everyone's way in) goes away, by SIGKILL and SIGTERM
alternately, and a fresh process takes its place --down seconds later. Round i of a peer
averages the number seed + i (its seed differs from the others'), so each peer checks its own
result: "valid" (finite and within the range of its group's inputs) must hold for every round
that succeeded; "exact" (their mean) holds unless a member dropped out mid-round.

`--bulk-links all` (the default here) sends every span of 1 MiB or more on a bulk link, which
is what `bulk_links = "auto"` picks where a peer has 4 cores or more: this soak runs that path on
any machine. Printed: one row per peer process (incarnation) with its rounds, failures, exact
and invalid rounds and how it ended; then the verdict: no invalid round, no traceback on any
peer's stderr, and every incarnation that lived 20 s or more averaged at least once.

Run from the repository root:

    .venv/bin/python benchmarks/bench_soak_averaging.py                    # 4 peers, 15 minutes
    .venv/bin/python benchmarks/bench_soak_averaging.py --seconds 120 --bulk-links auto
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from hivecli.averaging.settings import BULK_LINKS  # noqa: E402  # after the sys.path line

LIVED_ENOUGH = 20.0  # an incarnation that lived this long must have averaged at least once


class Peer:
    """One peer process; a thread reads its JSON events as they come."""

    def __init__(self, name: str, args: list[str], logs: Path) -> None:
        self.name, self.began, self.ended, self.how = name, time.monotonic(), None, "end"
        self.rounds = self.failed = self.exact = self.invalid = 0
        self.maddrs: list[str] = []
        self.listening = threading.Event()
        self.stderr_path = logs / f"{name}.stderr"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hivecli.netlab.peer", *args],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=self.stderr_path.open("w"),
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event: dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "listening":
                self.maddrs = list(event["maddrs"])
                self.listening.set()
            elif event.get("event") == "round":
                if not event["ok"]:
                    self.failed += 1
                    continue
                self.rounds += 1
                self.exact += bool(event["exact"])
                self.invalid += not event["valid"]

    def stop(self, sig: int, how: str) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.how = how
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.how += " (killed after 30 s)"
        self.ended = time.monotonic()
        self.reader.join(timeout=10)

    def tracebacks(self) -> int:
        return self.stderr_path.read_text(errors="replace").count("Traceback")


def peer_args(args: argparse.Namespace, seed: int, initial: list[str]) -> list[str]:
    return [
        "--listen", "/ip4/127.0.0.1/tcp/0", "--no-reachability-check", "--prefix", "soak",
        "--size", str(args.size), "--group-size", str(args.peers), "--min-group-size", "2",
        "--matchmaking-time", str(args.matchmaking_time), "--averaging-timeout", "15",
        "--bulk-links", args.bulk_links, "--seed", str(seed),
        *(["--initial-peers", *initial] if initial else []),
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--size", type=int, default=2_000_000, help="float32 elements averaged")
    parser.add_argument("--seconds", type=float, default=900.0)
    parser.add_argument("--churn-every", type=float, default=45.0, help="seconds between departures")
    parser.add_argument("--down", type=float, default=5.0, help="seconds before a departed peer is replaced")
    parser.add_argument("--matchmaking-time", type=float, default=1.0, help="min_matchmaking_time, seconds")
    parser.add_argument("--bulk-links", choices=BULK_LINKS, default="all")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="hive-soak-"))
    seeds = iter(range(0, 10**6, 1000))  # far apart: rounds of different peers never average the same number
    first = Peer("p0", peer_args(args, next(seeds), []), logs)
    everyone = [first]
    try:
        if not first.listening.wait(60):
            raise RuntimeError(f"peer p0 did not start; see {first.stderr_path}")
        live = {0: first}
        for i in range(1, args.peers):
            live[i] = Peer(f"p{i}", peer_args(args, next(seeds), first.maddrs), logs)
            everyone.append(live[i])
        start, departures = time.monotonic(), 0
        while time.monotonic() - start < args.seconds:
            time.sleep(min(args.churn_every, max(0.0, args.seconds - (time.monotonic() - start))))
            if time.monotonic() - start >= args.seconds:
                break
            slot = 1 + departures % (args.peers - 1)
            sig, how = (signal.SIGKILL, "SIGKILL") if departures % 2 == 0 else (signal.SIGTERM, "SIGTERM")
            live[slot].stop(sig, how)
            departures += 1
            time.sleep(args.down)  # the swarm runs one peer short meanwhile
            live[slot] = Peer(f"p{slot}.{departures}", peer_args(args, next(seeds), first.maddrs), logs)
            everyone.append(live[slot])
    finally:
        for peer in everyone:
            if peer.ended is None:
                peer.stop(signal.SIGTERM, "SIGTERM at the end")
    print(f"{args.peers} peers x {args.size:,} float32, bulk_links = {args.bulk_links!r}, {args.seconds:g} s")
    print(f"peers' logs: {logs}")
    print("| peer | lived s | rounds | failed | exact | invalid | tracebacks | ended by |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    problems = []
    for peer in everyone:
        lived = (peer.ended or time.monotonic()) - peer.began
        print(
            f"| {peer.name} | {lived:.0f} | {peer.rounds} | {peer.failed} | {peer.exact} | {peer.invalid} | "
            f"{peer.tracebacks()} | {peer.how} |"
        )
        if peer.invalid:
            problems.append(f"{peer.name} had {peer.invalid} invalid rounds")
        if peer.tracebacks():
            problems.append(f"{peer.name} printed a traceback ({peer.stderr_path})")
        if lived >= LIVED_ENOUGH and peer.rounds == 0:
            problems.append(f"{peer.name} lived {lived:.0f} s and never averaged")
    total = sum(p.rounds for p in everyone)
    print(f"rounds: {total} ok, {sum(p.failed for p in everyone)} failed, {sum(p.exact for p in everyone)} exact")
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
