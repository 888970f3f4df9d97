"""Peers on real hosts: network namespaces built by `hivecli.netlab`, one process per peer.

Each scenario starts `python -m hivecli.netlab.peer` processes (one DHT and one averager each,
printing a JSON line per round) in namespaces joined by an emulated internet, then changes the
network under them: a slow lossy link with latency, a partition that heals, the entry peer
killed, peers behind NAT. Each asserts the rounds (ok, group size, the average is right), that no
round outlives its timeout, and that no process printed a traceback or an ERROR line.

Needs root (namespaces, iptables); skipped with the reason where that is not allowed.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hivecli.netlab import NetLab, Node, netlab_unavailable

pytestmark = pytest.mark.slow

_UNAVAILABLE = netlab_unavailable()
if _UNAVAILABLE is not None:
    pytest.skip(f"network namespaces are not available here: {_UNAVAILABLE}", allow_module_level=True)

MATCHMAKING_S = 2.0
AVERAGING_TIMEOUT_S = 15.0
ROUND_LIMIT_S = AVERAGING_TIMEOUT_S * 2 + MATCHMAKING_S + 5  # finding a group, then averaging, then slack


class Peer:
    """One `hivecli.netlab.peer` process and the JSON events it printed."""

    def __init__(self, node: Node, *args: str):
        self.node = node
        self.proc = node.popen(
            [sys.executable, "-m", "hivecli.netlab.peer", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.events: list[dict[str, Any]] = []
        self.stderr_lines: list[str] = []
        self._lock = threading.Lock()
        self._new: queue.Queue[None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._on_event), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr_lines.append), daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self.listening = self.wait(lambda e: e["event"] == "listening", 60, "the peer to listen")

    def _on_event(self, line: str) -> None:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            return
        with self._lock:
            self.events.append(event)
        self._new.put(None)

    def _pump(self, pipe: Any, keep: Callable[[str], None]) -> None:
        for line in pipe:
            keep(line.rstrip("\n"))
        self._new.put(None)

    def wait(self, match: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        """The first event that matches (waiting for it until `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = next((e for e in self.events if match(e)), None)
            if found is not None:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.proc.poll() is not None and self._new.empty()):
                raise AssertionError(f"{self.node.name}: no {what} within {timeout:g} s; stderr:\n{self.stderr()}")
            try:
                self._new.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                pass

    def rounds(self) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["event"] == "round"]

    @property
    def address(self) -> str:
        return self.listening["maddrs"][0]

    def stderr(self) -> str:
        return "\n".join(self.stderr_lines[-40:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=30)
        for thread in self._threads:
            thread.join(timeout=10)

    def assert_quiet(self) -> None:
        """An expected network failure is one line with its reason: never a traceback or an ERROR."""
        noisy = [line for line in self.stderr_lines if "Traceback" in line or " ERROR " in line]
        assert not noisy, f"{self.node.name} printed:\n" + "\n".join(noisy[:10]) + "\n" + self.stderr()


def peer_args(prefix: str, group: int, *extra: str, min_group: int | None = None) -> list[str]:
    return [
        "--prefix", prefix, "--group-size", str(group), "--min-group-size", str(min_group or group),
        "--matchmaking-time", str(MATCHMAKING_S), "--averaging-timeout", str(AVERAGING_TIMEOUT_S), *extra,
    ]  # fmt: skip


def assert_rounds_bounded(peers: list[Peer]) -> None:
    for peer in peers:
        for event in peer.rounds():
            assert event["seconds"] <= ROUND_LIMIT_S, f"{peer.node.name}'s round hung: {event}"
            assert event["valid"] is not False, f"{peer.node.name} got a wrong average: {event}"


def full_round(size: int, after: float = 0.0) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["event"] == "round" and e["ok"] and e["group_size"] == size and e["start"] >= after


@pytest.fixture
def lab() -> Iterator[NetLab]:
    with NetLab() as built:
        yield built


def test_three_peers_over_a_slow_lossy_link_with_latency(lab: NetLab) -> None:
    """50 ms RTT, 1% loss each way, 50 Mbit/s on every host: every round completes with all three."""
    nodes = [lab.host(name, rate_mbit=50) for name in ("a", "b", "c")]
    for node in nodes:
        lab.set_delay(node, 50)
        lab.set_loss(node, 1)
    first = Peer(nodes[0], *peer_args("lossy", 3, "--rounds", "3", "--size", "100000"))
    peers = [first] + [
        Peer(node, *peer_args("lossy", 3, "--rounds", "3", "--size", "100000", "--initial-peers", first.address))
        for node in nodes[1:]
    ]
    for peer in peers:
        peer.wait(lambda e: e["event"] == "stopped", 180, "the end of its 3 rounds")
    for peer in peers:
        rounds = peer.rounds()
        print(peer.node.name, [(r["ok"], r["group_size"], round(r["seconds"], 2)) for r in rounds])
        assert [(r["ok"], r["group_size"], r["valid"]) for r in rounds] == [(True, 3, True)] * 3, rounds
        peer.assert_quiet()
    assert_rounds_bounded(peers)


def test_a_partitioned_peer_comes_back_after_the_heal(lab: NetLab) -> None:
    """One peer cut off for 15 s: the other two go on in pairs, its own rounds fail within their
    timeout, and after the heal it is back in full rounds."""
    nodes = [lab.host(name) for name in ("a", "b", "c")]
    args = peer_args("split", 3, min_group=2)
    a = Peer(nodes[0], *args)
    b, c = (Peer(node, *args, "--initial-peers", a.address) for node in nodes[1:])
    peers = [a, b, c]
    for peer in peers:
        peer.wait(full_round(3), 60, "a round of 3")
    cut = time.time()
    lab.isolate(nodes[2])
    for peer in (a, b):
        peer.wait(full_round(2, after=cut + 1), 60, "a round of 2 without the cut-off peer")
    c.wait(lambda e: e["event"] == "round" and not e["ok"] and e["start"] >= cut, 60, "a failed round while cut off")
    time.sleep(max(0.0, cut + 15 - time.time()))  # the partition lasts 15 s, whatever the rounds did
    lab.heal()
    healed = time.time()
    back = c.wait(full_round(3, after=healed), 90, "a round of 3 after the heal")
    print(f"heal -> first full round ended after {back['time'] - healed:.1f} s")
    for peer in peers:
        peer.stop()
        peer.assert_quiet()
    assert_rounds_bounded(peers)


def test_survivors_go_on_when_the_entry_peer_dies_and_a_newcomer_joins_through_one(lab: NetLab) -> None:
    nodes = [lab.host(name) for name in ("entry", "b", "c", "newcomer")]
    args = peer_args("orphans", 3, min_group=2)
    entry = Peer(nodes[0], *args)
    b, c = (Peer(node, *args, "--initial-peers", entry.address) for node in nodes[1:3])
    for peer in (entry, b, c):
        peer.wait(full_round(3), 60, "a round of 3")
    killed = time.time()
    entry.stop(signal.SIGKILL)  # no goodbye: its connections just stop answering
    for peer in (b, c):
        peer.wait(full_round(2, after=killed), 60, "a round of 2 without the entry peer")
    newcomer = Peer(nodes[3], *args, "--initial-peers", b.address)
    joined = newcomer.wait(full_round(3), 60, "a round of 3 with the newcomer")
    print(f"newcomer in a full round {joined['time'] - killed:.1f} s after the entry peer died")
    for peer in (b, c, newcomer):
        peer.stop()
        peer.assert_quiet()
    assert_rounds_bounded([b, c, newcomer])


def test_a_peer_behind_nat_learns_it_and_averages_through_a_relay(lab: NetLab) -> None:
    a, b = lab.host("a"), lab.host("b")
    router = lab.nat_router("r")
    hidden = lab.host("c", behind=router)
    args = peer_args("nat", 3, "--rounds", "3")
    first = Peer(a, *args)
    second = Peer(b, *args, "--initial-peers", first.address)
    natted = Peer(hidden, *args, "--initial-peers", first.address)
    reach = natted.listening["reachability"]
    print("behind NAT, the peer printed:", json.dumps(natted.listening, indent=1))
    assert reach["status"] == "unreachable" and reach["relayed"], reach
    assert reach["observed_host"] == router.ip  # it is seen as its router
    assert all("/p2p-circuit/" in m for m in natted.listening["maddrs"])  # its private address is not given out
    assert "forward TCP port" in reach["advice"]
    assert second.listening["reachability"]["status"] == "public"
    for peer in (first, second, natted):
        peer.wait(lambda e: e["event"] == "stopped", 120, "the end of its 3 rounds")
        assert [(r["ok"], r["group_size"]) for r in peer.rounds()] == [(True, 3)] * 3, peer.rounds()
        peer.assert_quiet()
    assert_rounds_bounded([first, second, natted])


def test_two_peers_behind_nat_average_through_a_relay_which_hive_peers_shows(lab: NetLab) -> None:
    relay_node = lab.host("relay")
    hidden = [lab.host(f"h{i}", behind=lab.nat_router(f"r{i}")) for i in (1, 2)]
    hive = os.path.join(os.path.dirname(sys.executable), "hive")
    relay_proc = relay_node.popen(
        [hive, "dht", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    assert relay_proc.stdout is not None
    listening = json.loads(relay_proc.stdout.readline())
    relay_addr = listening["maddrs"][0]
    args = peer_args("behind-nat", 2, "--size", "50000", "--initial-peers", relay_addr)
    peers = [Peer(node, *args) for node in hidden]
    for peer in peers:
        reach = peer.listening["reachability"]
        assert reach["status"] == "unreachable" and reach["relayed"], reach
    for peer in peers:
        peer.wait(lambda e: e["event"] == "round" and e["round"] == 2, 120, "3 rounds")
        assert [(r["ok"], r["group_size"], r["valid"]) for r in peer.rounds()[:3]] == [(True, 2, True)] * 3
    # `hive peers`, from a third host, shows the relay's traffic and the peers behind it
    shown = lab.host("viewer").run([hive, "peers", relay_addr, "--json", "--timeout", "5"], timeout=60)
    report = json.loads(shown.stdout)
    print("hive peers:", json.dumps(report["peers"], indent=1))
    rows = {row["peer_id"]: row for row in report["peers"]}
    relay_row = rows[listening["peer_id"]]
    assert relay_row["relay"]["reservations"] == 2 and relay_row["relay"]["circuits_total"] >= 1
    assert relay_row["relay"]["bytes"] > 3 * 50000 * 4  # three rounds of 200 kB each way went through it
    for peer in peers:
        assert rows[peer.listening["peer_id"]]["relays"] == [listening["peer_id"]]
    for peer in peers:
        peer.stop()
        peer.assert_quiet()
    assert_rounds_bounded(peers)
    relay_proc.terminate()
    assert relay_proc.wait(timeout=30) == 0
    assert relay_proc.stderr is not None
    relay_log = relay_proc.stderr.read()
    assert "Traceback" not in relay_log and " ERROR " not in relay_log, relay_log
