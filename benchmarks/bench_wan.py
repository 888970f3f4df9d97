"""WAN benchmark: DecentralizedAverager between network namespaces on shaped links (hivecli.netlab).

Every peer is a `python -m hivecli.netlab.peer` process in a namespace of its own on netlab's
emulated internet segment; its link is limited to --rate Mbit/s in each direction (tc tbf on both
ends of its veth), and in the "50 ms" rows every node gets `set_latency(node, 25)`: every packet
it receives waits 25 ms, so that a round trip between two peers takes 50 ms more, and TCP stays
end to end (`--delay proxy`: `set_delay(node, 50)` instead, a delaying proxy that every TCP
connection a peer opens goes through; TCP then ends at the proxy, which hides the link's drops
from the sender).

Averaging, per (peers N, RTT, compression): N peers average --size float32 elements in groups
of exactly N (target_group_size = min_group_size = N), one warm-up round and --rounds timed
rounds. Before each round all peers pass a barrier (files in a shared directory), so that they
start together; step = max end - min start over the peers, per round; the table gives the median
(and min-max) over the timed rounds. Every peer checks after each round that its tensor is the
mean of its group's inputs (float16 rounding allowed): "exact" counts rounds where all did.

Link use: in butterfly all-reduce each of the N peers reduces 1/N of the tensor. A peer sends
the other N-1 reducers their parts of its tensor, (N-1)/N of it, and sends its own averaged
part back to each of them, (N-1)/N again; it receives as much. Out and in share nothing on a
full-duplex link, so per step each direction of each link carries

    bytes = 2 * size * bytes_per_element * (N - 1) / N    (bytes_per_element: 4; 2 with float16,
                                                           which the averaged parts use too)
    ratio = (bytes * 8 / step_seconds) / (rate_mbit * 1e6)

1.0 would be the link saturated for the whole step, matchmaking included; TCP/IP and encryption
headers take about 4 % of a 1500-byte frame, so about 0.96 is the ceiling. (Counting only the
first half, size * b * (N-1)/N, would give half these ratios.) "MB out (tc)" checks the formula
with the bytes tc counted on each peer's link: its mean per round over the whole run, warm-up
and DHT traffic included. "allreduce s" is the median time from group assembly to the end.
"drops" are the packets the tbf of each peer's uplink and downlink dropped, per round (warm-up
included). --trace splits each round by each peer's uplink use (start, middle and the share of
the rate it carried, tail: benchmarks/_linkuse.py), and counts the rounds in which a connection's
congestion window collapsed without a loss (benchmarks/_tcptrace.py); --no-audit turns the reducer audit off;
--pace tells every peer its link's rate (AveragingSettings.uplink_mbps), so that rounds pace
each connection to its share of it; otherwise every peer learns the rate (--pacing auto, the
averager's default: hivecli/averaging/pacing.py) or leaves it to TCP (--pacing off). "paced at"
is the rate a peer's next round paces its connections to, all together (median over the peers;
"-": unpaced).

Partition: 3 peers (target group 3, minimum 2) average --partition-size elements back to back
with no barrier; once every peer has averaged in a full group, the last one is isolated
(`lab.isolate`) for --isolate seconds, then `lab.heal()`. Reported: the rounds of the isolated
peer and of the others while it was cut off, and the seconds from the heal to the end of the
first round in which the healed peer (and each other peer) was in a group of 3 again, and the
averages that were not finite and within the inputs' range ("invalid"; there should be none) or
not the mean of the whole group ("inexact": a member dropped out mid-round).

Needs root (network namespaces; see `hivecli.netlab.netlab_unavailable`). From the repository root:

    .venv/bin/python benchmarks/bench_wan.py            # about 6 minutes on 2 cores
    .venv/bin/python benchmarks/bench_wan.py --quick    # about 2-3 minutes: 2 timed rounds, 20 s partition
    .venv/bin/python benchmarks/bench_wan.py --peers 2 --rtt 50 --compression float16 --no-partition
    .venv/bin/python benchmarks/bench_wan.py --quick --no-partition --no-slow-start-after-idle  # doctor's advice
    .venv/bin/python benchmarks/bench_wan.py --quick --no-partition --bulk-links all  # spans on links of their own
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SLOW_START_SYSCTL = "/proc/sys/net/ipv4/tcp_slow_start_after_idle"
CONGESTION_SYSCTL = "/proc/sys/net/ipv4/tcp_congestion_control"
ALLOWED_CONGESTION = "/proc/sys/net/ipv4/tcp_allowed_congestion_control"
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from hivecli.averaging.settings import BULK_LINKS, PACINGS  # noqa: E402  # after the sys.path line
from hivecli.netlab import NetLab, Node, latency_unavailable, netlab_unavailable  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _linkuse  # noqa: E402
from _tcptrace import Collapse, CwndTrace  # noqa: E402

# "auto" measures the link in its first (warm-up) round, exact, and picks float16 on these links after it
BYTES_PER_ELEMENT = {"none": 4, "float16": 2, "auto": 2}
STARTUP_TIMEOUT = 180.0  # a peer imports torch and joins the DHT; slow when 4 start at once on 2 cores


class Peer:
    """One peer process and the JSON lines it printed so far (filled by a reader thread)."""

    def __init__(self, index: int, node: Node, proc: subprocess.Popen[str], log: Path) -> None:
        self.index, self.node, self.proc, self.log = index, node, proc, log
        self.events: list[dict[str, Any]] = []
        self.eof = False
        self.maddrs: list[str] = []

    def rounds(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "round"]

    def stopped(self) -> bool:
        return any(e["event"] == "stopped" for e in self.events)

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " / ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Swarm:
    """Peers in a NetLab; `wait` blocks until a condition on their output holds (or a peer died)."""

    def __init__(self, lab: NetLab, workdir: Path) -> None:
        self.lab, self.workdir = lab, workdir
        self.peers: list[Peer] = []
        self._changed = threading.Condition()
        self._readers: list[threading.Thread] = []

    def start(self, nodes: list[Node], peer_args: list[str]) -> None:
        """Start a peer on each node: the first one, then the others at once, joining the DHT through it.

        Raises:
            RuntimeError: a peer exited or did not listen within STARTUP_TIMEOUT.
        """
        self._launch(0, nodes[0], peer_args)
        for index, node in enumerate(nodes[1:], start=1):
            self._launch(index, node, [*peer_args, "--initial-peers", *self.peers[0].maddrs])

    def _launch(self, index: int, node: Node, peer_args: list[str]) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        argv = [sys.executable, "-m", "hivecli.netlab.peer", *peer_args, "--seed", str(index)]
        log = self.workdir / f"peer{index}.log"
        with open(log, "w") as stderr:  # the child keeps its own descriptor
            proc = node.popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO_ROOT, env=env)
        peer = Peer(index, node, proc, log)
        self.peers.append(peer)
        reader = threading.Thread(target=self._read, args=(peer,), daemon=True)
        reader.start()
        self._readers.append(reader)
        if index == 0:  # the others need its address; they start together, and wait at the barrier
            self.wait(lambda: any(e["event"] == "listening" for e in peer.events), STARTUP_TIMEOUT, "listening")
            listening = next(e for e in peer.events if e["event"] == "listening")
            peer.maddrs = [m for m in listening["maddrs"] if f"/ip4/{node.ip}/" in m]

    def _read(self, peer: Peer) -> None:
        assert peer.proc.stdout is not None
        for line in peer.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # not ours (a library printing to stdout)
            with self._changed:
                peer.events.append(event)
                self._changed.notify_all()
        with self._changed:
            peer.eof = True
            self._changed.notify_all()

    def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Block until `condition()` holds.

        Raises:
            RuntimeError: after `timeout` seconds, or when a peer exited before it held.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition():
                self._check_alive(what)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
                self._changed.wait(remaining)

    def hold(self, seconds: float, what: str) -> None:
        """Let `seconds` pass (a phase of a scenario), watching the peers.

        Raises:
            RuntimeError: a peer exited meanwhile.
        """
        deadline = time.monotonic() + seconds
        with self._changed:
            while (remaining := deadline - time.monotonic()) > 0:
                self._check_alive(what)
                self._changed.wait(remaining)

    def _check_alive(self, what: str) -> None:
        dead = [p for p in self.peers if p.eof and not p.stopped()]
        if dead:
            raise RuntimeError(f"peer {dead[0].index} exited during {what}: {dead[0].log_tail()}")

    def stop(self) -> None:
        """SIGTERM every peer (they print "stopped" and exit) and reap them."""
        for peer in self.peers:
            self.lab.stop(peer.proc, grace=30)
        for reader in self._readers:
            reader.join(timeout=10)


# ---- averaging -----------------------------------------------------------------------------------


def run_averaging(
    peers: int,
    rtt_ms: float,
    compression: str,
    size: int,
    rounds: int,
    rate: float,
    timeout: float,
    bulk_links: str = "auto",
    slow_start_after_idle: bool = True,
    congestion: str | None = None,
    audit: bool = True,
    trace: bool = False,
    pace: bool = False,
    delay: str = "latency",
    pacing: str = "auto",
    loss: float = 0.0,
) -> dict[str, Any]:
    """One configuration; its row of the table. `trace`: also split each round's time by link use
    (_linkuse.py).

    Raises:
        RuntimeError: a peer died or the rounds did not finish in time.
    """
    with NetLab() as lab, tempfile.TemporaryDirectory(prefix="bench-wan-") as tmp:
        nodes = [lab.host(f"p{i}", rate_mbit=rate) for i in range(peers)]
        for node in nodes:
            if rtt_ms and delay == "latency":  # every packet a peer receives waits half the round trip
                lab.set_latency(node, rtt_ms / 2)
            elif rtt_ms:  # every connection a peer opens goes through its delaying proxy
                lab.set_delay(node, rtt_ms)
            if loss:  # random loss on the link, each way, besides what its queue drops
                lab.set_loss(node, loss)
            if not slow_start_after_idle:  # what `hive doctor` advises; a namespace has its own setting
                _sysctl(node, SLOW_START_SYSCTL, "0")
            if congestion:  # the namespace's default, for sockets that do not choose their own
                _sysctl(node, CONGESTION_SYSCTL, congestion)
        barrier = Path(tmp) / "barrier"
        barrier.mkdir()
        swarm = Swarm(lab, Path(tmp))
        args = ["--prefix", f"wan{peers}", "--size", str(size), "--group-size", str(peers)]
        args += ["--rounds", str(rounds + 1), "--compression", compression, "--barrier-dir", str(barrier)]
        args += ["--matchmaking-time", "5", "--averaging-timeout", str(timeout), "--bulk-links", bulk_links]
        args += [] if audit else ["--no-audit"]
        args += ["--pacing", pacing]
        args += ["--uplink-mbps", str(rate)] if pace else []  # the peers are told their link's rate
        samplers = []
        cwnd_trace = None
        if trace:
            script = Path(_linkuse.__file__)
            for i, node in enumerate(nodes):
                samplers.append(node.popen([sys.executable, script, node.link, Path(tmp) / f"link{i}"]))
            if CwndTrace.unavailable() is None:
                cwnd_trace = CwndTrace(nodes[0].ip.rsplit(".", 1)[0] + ".")
                cwnd_trace.start()
        collapses: list[Collapse] = []
        try:
            swarm.start(nodes, args)
            budget = (rounds + 1) * (timeout + 10)
            swarm.wait(lambda: all(p.stopped() for p in swarm.peers), budget, f"{rounds + 1} rounds")
            counters = [_tc_counters(node) for node in nodes]
        finally:
            if cwnd_trace is not None:
                collapses = cwnd_trace.stop()
            for sampler in samplers:
                lab.stop(sampler)
            swarm.stop()
        links = [_linkuse.load(str(Path(tmp) / f"link{i}")) for i in range(len(nodes))] if trace else []
    steps, allreduces, splits, failed, exact = [], [], [], 0, 0
    collapsed: list[bool] = []  # per round that succeeded: whether a connection's window collapsed quietly in it
    errors: set[str] = set()  # why the failed rounds failed
    for i in range(1, rounds + 1):  # round 0 warms up (connections, buffers)
        records = [next(r for r in p.rounds() if r["round"] == i) for p in swarm.peers]
        if not all(r["ok"] and r["group_size"] == peers for r in records):
            failed += 1
            errors.update(r["error"] or f"a group of {r['group_size']}" for r in records if r["error"] or not r["ok"])
            continue
        start, end = min(r["start"] for r in records), max(r["time"] for r in records)
        steps.append(end - start)
        collapsed.append(any(c.quiet and start <= c.time <= end for c in collapses))
        allreduces.append(max(r["allreduce_seconds"] for r in records))
        exact += all(r["exact"] for r in records)
        # each peer's uplink over the whole step, averaged over the peers
        parts = [_linkuse.split_round(link, start, end, rate * 1e6) for link in links]
        if parts:
            splits.append({k: statistics.mean(p[k] for p in parts) for k in parts[0]})
    if not steps:
        errors = {r["error"] for p in swarm.peers for r in p.rounds() if r["error"]}
        raise RuntimeError(f"no round succeeded: {sorted(errors)[:2]}")
    step = statistics.median(steps)
    moved = 2 * size * BYTES_PER_ELEMENT[compression] * (peers - 1) / peers
    return {
        "step": step,
        "min": min(steps),
        "max": max(steps),
        "allreduce": statistics.median(allreduces),
        "ratio": moved * 8 / step / (rate * 1e6),
        "mb": moved / 1e6,
        "tc_mb": statistics.mean(sent for sent, _, _ in counters) / (rounds + 1) / 1e6,
        "exact": f"{exact}/{len(steps)}",
        "failed": failed,
        "errors": sorted(errors),
        # packets the links' tbf dropped per round (warm-up and DHT traffic included), mean over the peers
        "drops_up": statistics.mean(up for _, up, _ in counters) / (rounds + 1),
        "drops_down": statistics.mean(down for _, _, down in counters) / (rounds + 1),
        "split": {k: statistics.median(s[k] for s in splits) for k in splits[0]} if splits else None,
        # --trace as root: rounds in which a connection's congestion window collapsed without a
        # retransmission (_tcptrace.py), and the median step of those and of the others
        "collapsed": f"{sum(collapsed)}/{len(steps)}" if cwnd_trace is not None else None,
        "step_collapsed": _median_or_none([s for s, c in zip(steps, collapsed, strict=True) if c]),
        "step_clean": _median_or_none([s for s, c in zip(steps, collapsed, strict=True) if not c]),
        # the rate a peer's next round paces all its connections together to (PACING_SHARE of --rate
        # with --pace; what pacing = "auto" learned otherwise), median over the peers; None: unpaced
        "paced": _median_or_none([r.get("pace_mbps") for r in records]),
    }


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _sysctl(node: Node, path: str, value: str) -> None:
    """Write `value` to `path` in `node`'s namespace and read it back.

    Raises:
        RuntimeError: the kernel refused it, or kept another value (a namespace may only choose
            a congestion control the root namespace allows: net.ipv4.tcp_allowed_congestion_control).
    """
    script = f"with open({path!r}, 'w') as f: f.write({value!r})\nprint(open({path!r}).read().strip())"
    result = node.run([sys.executable, "-c", script], check=False)
    if result.returncode != 0 or result.stdout.strip() != value:
        error = result.stderr.strip().splitlines()[-1:] or [f"it reads {result.stdout.strip()!r}"]
        raise RuntimeError(f"could not set {path} = {value!r} in {node.name}'s namespace: {error[0]}")


def _tc_counters(node: Node) -> tuple[int, int, int]:
    """What the tbf of `node`'s link counted so far: (bytes its uplink sent, everything it put on
    the wire; packets its uplink dropped; packets its downlink dropped).

    Raises:
        RuntimeError: tc printed no byte counter.
    """
    up = node.run(["tc", "-s", "qdisc", "show", "dev", node.link], timeout=30).stdout
    down = subprocess.run(
        ["tc", "-n", node.peer_ns, "-s", "qdisc", "show", "dev", node.peer_link],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    sent = re.search(r"Sent (\d+) bytes", up)
    if sent is None:
        raise RuntimeError(f"no byte counter in `tc -s qdisc show dev {node.link}`: {up!r}")
    up_drops, down_drops = (int(m.group(1)) if (m := re.search(r"dropped (\d+)", out)) else 0 for out in (up, down))
    return int(sent.group(1)), up_drops, down_drops


# ---- partition -----------------------------------------------------------------------------------


def run_partition(size: int, isolate_s: float, rate: float) -> dict[str, Any]:
    """The isolate-and-heal scenario; its results.

    Raises:
        RuntimeError: a peer died, or the swarm did not form full groups (before, or within 240 s after the heal).
    """
    with NetLab() as lab, tempfile.TemporaryDirectory(prefix="bench-wan-") as tmp:
        nodes = [lab.host(f"p{i}", rate_mbit=rate) for i in range(3)]
        swarm = Swarm(lab, Path(tmp))
        args = ["--prefix", "wan-partition", "--size", str(size), "--group-size", "3", "--min-group-size", "2"]
        args += ["--rounds", "0", "--matchmaking-time", "2", "--averaging-timeout", "15"]
        try:
            swarm.start(nodes, args)

            def full_since(peer: Peer, since: float) -> dict[str, Any] | None:
                return next((r for r in peer.rounds() if r["ok"] and r["group_size"] == 3 and r["time"] > since), None)

            swarm.wait(lambda: all(full_since(p, 0) for p in swarm.peers), 120, "a first full group")
            cut, isolated = swarm.peers[-1], nodes[-1]
            isolated_at = time.time()
            lab.isolate(isolated)
            swarm.hold(isolate_s, "the partition")
            healed_at = time.time()
            lab.heal()
            swarm.wait(lambda: all(full_since(p, healed_at) for p in swarm.peers), 240, "full groups after the heal")
        finally:
            swarm.stop()
    during = [[r for r in p.rounds() if isolated_at <= r["time"] <= healed_at] for p in swarm.peers]
    others = [r for rounds in during[:-1] for r in rounds]
    recovered = {p.index: full_since(p, healed_at)["time"] - healed_at for p in swarm.peers}  # type: ignore[index]
    return {
        "isolated": cut.index,
        "isolated_rounds": f"{sum(r['ok'] for r in during[-1])} ok / {len(during[-1])}",
        "isolated_errors": sorted({(r["error"] or "").split(":")[0] for r in during[-1] if not r["ok"]}),
        "others_rounds": f"{sum(r['ok'] for r in others)} ok / {len(others)}",
        "others_sizes": sorted({r["group_size"] for r in others if r["ok"]}),
        "others_errors": sorted({(r["error"] or "").split(":")[0] for r in others if not r["ok"]}),
        "recovery": recovered[cut.index],
        "others_recovery": max(v for k, v in recovered.items() if k != cut.index),
        "invalid": sum(1 for p in swarm.peers for r in p.rounds() if r["ok"] and not r["valid"]),
        "inexact": sum(1 for p in swarm.peers for r in p.rounds() if r["ok"] and not r["exact"]),
    }


# ---- main ----------------------------------------------------------------------------------------


def _attempt(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """fn's result, or {"error": ...}, so that the other configurations still run."""
    try:
        return fn(*args)
    except Exception as e:  # reported in the table
        return {"error": f"{type(e).__name__}: {e}".replace("|", "/")}


def _averaging_row(peers: int, rtt: float, compression: str, r: dict[str, Any]) -> str:
    head = f"| {peers} | {rtt:g} | {compression} |"
    if "error" in r:
        return f"{head} FAILED: {r['error']} | | | | | | | | |"
    failed = f" ({r['failed']} failed)" if r["failed"] else ""
    paced = "-" if r.get("paced") is None else f"{r['paced']:.1f}"
    return (
        f"{head} {r['step']:.2f} ({r['min']:.2f}-{r['max']:.2f}){failed} | {r['allreduce']:.2f} | {r['mb']:.1f} "
        f"| {r['tc_mb']:.1f} | {r['mb'] * 8 / r['step']:.1f} | {r['ratio']:.2f} | {r['exact']} "
        f"| {r['drops_up']:.0f} / {r['drops_down']:.0f} | {paced} |"
    )


def _split_row(peers: int, rtt: float, compression: str, r: dict[str, Any]) -> str:
    split = r.get("split")
    if split is None:
        return f"| {peers} | {rtt:g} | {compression} | no trace | | | | | |"

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    collapsed = r.get("collapsed") or "no tracefs"
    return (
        f"| {peers} | {rtt:g} | {compression} | {r['step']:.2f} | {split['start']:.2f} "
        f"| {split['middle']:.2f} ({split['use']:.2f}) | {split['tail']:.2f} | {collapsed} "
        f"| {seconds(r.get('step_collapsed'))} / {seconds(r.get('step_clean'))} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, nargs="*", default=[2, 4], help="peer counts (none: partition only)")
    parser.add_argument("--rtt", type=float, nargs="+", default=[0, 50], help="added round-trip times, ms")
    parser.add_argument(
        "--compression", nargs="+", default=["none", "float16", "auto"], choices=list(BYTES_PER_ELEMENT)
    )
    parser.add_argument("--size", type=int, default=10_000_000, help="float32 elements averaged")
    parser.add_argument("--rate", type=float, default=100.0, help="every link's rate, Mbit/s each way")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds after a warm-up (default 5; 2 --quick)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a round may take before it fails")
    parser.add_argument("--isolate", type=float, default=None, help="seconds of partition (default 40; 20 --quick)")
    parser.add_argument("--partition-size", type=int, default=100_000)
    parser.add_argument(
        "--bulk-links",
        choices=BULK_LINKS,
        default="auto",
        help="AveragingSettings.bulk_links of every peer (default auto, as the averager's)",
    )
    parser.add_argument(
        "--no-slow-start-after-idle",
        action="store_true",
        help="net.ipv4.tcp_slow_start_after_idle = 0 in every peer's namespace, as `hive doctor` advises",
    )
    parser.add_argument(
        "--congestion",
        help="net.ipv4.tcp_congestion_control in every peer's namespace (one the root namespace allows: "
        "net.ipv4.tcp_allowed_congestion_control; default: the system's)",
    )
    parser.add_argument(
        "--pacing",
        choices=PACINGS,
        default="auto",
        help="every peer's AveragingSettings.pacing, where --pace does not tell it the rate (default auto, as the "
        "averager's: it learns the rate; off: TCP alone)",
    )
    parser.add_argument(
        "--loss", type=float, default=0.0, help="percent of packets dropped at random on every link, each way"
    )
    parser.add_argument("--no-audit", action="store_true", help="verify_reducers = False: what the audit costs")
    parser.add_argument(
        "--pace", action="store_true", help="tell the peers their link's rate (uplink_mbps = --rate): paced rounds"
    )
    parser.add_argument(
        "--trace", action="store_true", help="also split each round by each peer's link use (benchmarks/_linkuse.py)"
    )
    parser.add_argument(
        "--delay",
        choices=("latency", "proxy"),
        default="latency",
        help="how --rtt is added: every packet a peer receives held rtt/2 (NetLab.set_latency, TCP end to end; "
        "the default) or every connection a peer opens through a delaying proxy (NetLab.set_delay)",
    )
    parser.add_argument("--no-partition", action="store_true", help="skip the partition scenario")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and a shorter partition (about 3 min)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    reason = netlab_unavailable()
    if reason is not None:
        sys.exit(f"bench_wan needs hivecli.netlab: {reason}")
    if args.delay == "latency" and any(args.rtt) and (reason := latency_unavailable()) is not None:
        sys.exit(f"bench_wan --delay latency (the default) cannot run here: {reason}; use --delay proxy")
    allowed = Path(ALLOWED_CONGESTION).read_text().split()
    if args.congestion and args.congestion not in allowed:
        sys.exit(
            f"bench_wan --congestion {args.congestion}: a network namespace may only choose a congestion control "
            f"that the root namespace allows ({ALLOWED_CONGESTION} = {' '.join(allowed)}); allow it first "
            f"(sysctl -w net.ipv4.tcp_allowed_congestion_control='{' '.join([*allowed, args.congestion])}') or "
            "choose one of those"
        )
    congestion = args.congestion or Path(CONGESTION_SYSCTL).read_text().strip()
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    isolate = args.isolate if args.isolate is not None else (20.0 if args.quick else 40.0)
    began = time.monotonic()

    results = []
    for peers in args.peers:
        for rtt in args.rtt:
            for compression in args.compression:
                r = _attempt(
                    run_averaging,
                    peers,
                    rtt,
                    compression,
                    args.size,
                    rounds,
                    args.rate,
                    args.timeout,
                    args.bulk_links,
                    not args.no_slow_start_after_idle,
                    args.congestion,
                    not args.no_audit,
                    args.trace,
                    args.pace,
                    args.delay,
                    args.pacing,
                    args.loss,
                )
                results.append({"peers": peers, "rtt_ms": rtt, "compression": compression, **r})
                print(_averaging_row(peers, rtt, compression, r), flush=True)  # progress; the table follows
    partition = None if args.no_partition else _attempt(run_partition, args.partition_size, isolate, args.rate)

    print()
    print(
        f"Averaging {args.size / 1e6:g}M float32 over {args.rate:g} Mbit/s links (each way), median of {rounds} "
        f"rounds after a warm-up; ratio = (MB each way x 8 / step) / link rate, MB each way = 2 x size x bytes "
        f"x (N-1)/N; TCP congestion control {congestion}"
        + ("; every peer paced to its link's rate (--pace):" if args.pace else ":")
    )
    print(
        "| peers | added RTT ms | compression | step s (min-max) | allreduce s | MB each way per peer "
        "| MB out (tc) | Mbit/s | ratio | exact | drops per round up / down | paced at Mbit/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(_averaging_row(r["peers"], r["rtt_ms"], r["compression"], r))
    if args.trace:
        print()
        print(
            "Where the step goes (--trace; medians over rounds of the mean over peers of each peer's uplink): "
            "start = until its link first carried half its rate over 50 ms, middle (its share of the link "
            "rate), tail = after it last did; rounds in which a connection's congestion window collapsed "
            "without a retransmission (_tcptrace.py), and the median step of those rounds and of the others:"
        )
        print(
            "| peers | added RTT ms | compression | step s | start s | middle s (use) | tail s | rounds with a "
            "collapse | step s, those / the others |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in results:
            if "error" not in r:
                print(_split_row(r["peers"], r["rtt_ms"], r["compression"], r))
    if partition is not None:
        print()
        print(
            f"Partition: 3 peers, {args.partition_size / 1e3:g}k float32, groups of 3 (2 at least), back to back; "
            f"one peer isolated {isolate:g} s, then healed:"
        )
        print(
            "| isolated peer's rounds (cut off) | its errors | others' rounds (cut off) | their errors | group sizes "
            "| heal -> healed peer in a full group, s | heal -> every other peer too, s | averages invalid / inexact |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        if "error" in partition:
            print(f"| FAILED: {partition['error']} | | | | | | | |")
        else:
            p = partition
            print(
                f"| {p['isolated_rounds']} | {', '.join(p['isolated_errors']) or '-'} | {p['others_rounds']} "
                f"| {', '.join(p['others_errors']) or '-'} "
                f"| {p['others_sizes']} | {p['recovery']:.1f} | {p['others_recovery']:.1f} "
                f"| {p['invalid']} / {p['inexact']} |"
            )
    print(f"\n({time.monotonic() - began:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"averaging": results, "partition": partition}, f, indent=2)


if __name__ == "__main__":
    main()
