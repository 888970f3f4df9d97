"""A network lab for tests and benchmarks: hosts in network namespaces, NAT routers, rate limits, loss,
latency and partitions, built with iproute2 and iptables (Linux, as root).

    from hivecli.netlab import NetLab, latency_unavailable, netlab_unavailable

    if (reason := netlab_unavailable()) is not None:
        pytest.skip(reason)
    with NetLab() as lab:
        a = lab.host("a")                         # on the shared "internet" segment, 10.N.0.X/24
        b = lab.host("b", rate_mbit=100)          # its link shaped to 100 Mbit/s each way (tc tbf)
        r = lab.nat_router("r")                   # internet leg + a private LAN 10.N.K.0/24 behind MASQUERADE
        c = lab.host("c", behind=r)               # reaches a and b through r; nobody can dial it
        server = b.popen([sys.executable, "-m", "http.server", "8000"])
        lab.set_latency(a, 25)                    # every packet a receives arrives 25 ms later
        lab.set_delay(a, 50)                      # every TCP connection a opens gets 50 ms more round trip
        lab.set_loss(b, 1)                        # 1 % of the packets on b's link dropped, each way
        lab.partition([a], [b, c]); lab.heal()    # and lab.isolate(a)

Layout: the internet segment is a bridge in a namespace of its own (the "switch"), every host and
router hangs off it by a veth pair, and hosts behind a router hang off a bridge inside the router's
namespace. The root namespace is never changed: each veth pair is created directly inside the two
namespaces it joins. Every name starts with the lab's prefix ("hl" and 4 random hex digits), so
labs running in parallel never collide, and closing the lab (also on error, and at interpreter
exit as a last resort) stops the processes it started and deletes its namespaces.

Latency without netem: `set_latency(node, ms)` runs `python -m hivecli.netlab.latency` in the
node's namespace and hands it every packet that arrives on the node's link (iptables NFQUEUE); it
lets each one go `ms` later (see latency.py). TCP stays end to end: a sender sees the whole round
trip, the link's drops and its own retransmissions, as on a real path. With the same latency on
two nodes, a round trip between them takes twice it more. It delays packets after they crossed
the link's rate limit, where the veth has already detached them from the sending socket: held
before it, they would count against the sender's TCP small queues and throttle it to a trickle.

Delay through a proxy: `set_delay` runs `python -m hivecli.netlab.proxy` in the node's namespace and
redirects the node's outgoing TCP connections through it (see proxy.py). It applies to TCP only,
and to connections the node opens: with the same delay on every node, every connection has that
round-trip time whichever side dialled. While a delay is set, connecting to an unreachable address
succeeds locally and then the proxy resets the connection when its own dial fails. The proxy of a
shaped node holds what its link carries in the added round trip (at least 256 KiB; at the rate
the node had when the delay was set) per direction, in its queue and in each socket's kernel
buffer, as a real path would: one that holds far more acknowledges a sender's bytes long before
they cross the link, and its TCP never sees the link's pace. TCP still ends at the proxy: the
sender's socket sees neither the added round trip nor the losses on the link (the proxy's
upstream socket does), so what TCP_INFO says there is about the proxy, not the path.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import random
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

__all__ = ["NetLab", "NetLabError", "Node", "latency_unavailable", "netlab_unavailable"]

COMMAND_TIMEOUT = 30.0  # seconds for one ip/tc/iptables command; they take milliseconds
STOP_GRACE = 5.0  # seconds a process gets between SIGTERM and SIGKILL at close
PROXY_MARK = 0x4E4C  # SO_MARK of the delay proxy's own connections ("NL"), exempt from the redirect
PROXY_MIN_BUFFER = 256 * 1024  # bytes the proxy of a shaped node holds per direction, at least
SWITCH = "switch"  # the internet segment's namespace is <prefix>-switch, so no node may be called that
# iptables chains netlab owns in every node namespace; each is rewritten whole with iptables-restore
PART_CHAIN, LOSS_CHAIN, DELAY_CHAIN = "NETLAB-PART", "NETLAB-LOSS", "NETLAB-DELAY"
LATENCY_CHAIN = "NETLAB-LATENCY"  # mangle PREROUTING on the link: to the latency process's queue
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,19}")
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class NetLabError(RuntimeError):
    """A command that builds or changes the lab failed; the message names the command and its stderr."""

    def __init__(self, message: str, argv: Sequence[str] = (), returncode: int | None = None, stderr: str = ""):
        super().__init__(message)
        self.argv, self.returncode, self.stderr = list(argv), returncode, stderr


def _run(argv: Sequence[str], *, stdin: str | None = None, timeout: float = COMMAND_TIMEOUT) -> str:
    """Run a lab command and return its stdout.

    Raises:
        NetLabError: the command is missing, failed or timed out.
    """
    command = shlex.join(argv)
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetLabError(f"`{command}` could not run: {e}", argv) from e
    if proc.returncode != 0:
        stderr = proc.stderr.strip()
        raise NetLabError(
            f"`{command}` exited with {proc.returncode}: {stderr or '(no stderr)'}", argv, proc.returncode, stderr
        )
    return proc.stdout


def _namespaces() -> list[str]:
    """Names of the network namespaces `ip netns` knows.

    Raises:
        NetLabError: `ip netns list` failed.
    """
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line.strip()]


def _enable_forwarding(ns: str) -> None:
    """Turn IPv4 forwarding on in `ns`.

    Raises:
        NetLabError: the write failed.
    """
    # /proc/sys/net belongs to the namespace of the process that opens it; Python rather than
    # `sysctl`, which slim images lack (procps)
    _run(["ip", "netns", "exec", ns, sys.executable, "-c", "open('/proc/sys/net/ipv4/ip_forward', 'w').write('1')"])


@functools.lru_cache(maxsize=1)
def netlab_unavailable() -> str | None:
    """None when NetLab works here, else one sentence saying why not (for `pytest.skip`).

    Tries what a lab does in a scratch namespace: a bridge, a veth pair, tbf, and the iptables
    matches and targets netlab uses. The answer is cached for the life of the process.
    """
    if not sys.platform.startswith("linux"):
        return "netlab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "netlab needs root (it creates network namespaces)"
    for tool in ("ip", "tc", "iptables", "iptables-restore"):
        if shutil.which(tool) is None:
            return f"netlab needs `{tool}`, which is not on PATH"
    try:
        with _scratch_namespace() as ns:
            return _probe_tools(ns)
    except NetLabError as e:
        return f"`ip netns add` is not permitted here: {e}"


@contextlib.contextmanager
def _scratch_namespace() -> Iterator[str]:
    """A namespace of its own for a probe, deleted after.

    Raises:
        NetLabError: `ip netns add` failed.
    """
    ns = f"hlprobe{os.getpid()}x{random.getrandbits(16):04x}"
    _run(["ip", "netns", "add", ns])
    try:
        yield ns
    finally:
        with contextlib.suppress(NetLabError):
            _run(["ip", "netns", "del", ns])


def _probe_tools(ns: str) -> str | None:
    """None if what a lab does works in namespace `ns`, else why not."""
    try:
        _run(["ip", "-n", ns, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1"])
        tbf = ["tbf", "rate", "100mbit", "burst", "64kb", "latency", "25ms"]
        _run(["tc", "-n", ns, "qdisc", "add", "dev", "v0", "root", *tbf])
        _enable_forwarding(ns)
        rules = (
            "*filter\n-A OUTPUT -m conntrack --ctorigdst 10.0.0.1 -j DROP\nCOMMIT\n"
            "*mangle\n-A POSTROUTING -o v0 -m statistic --mode random --probability 0.5 -j DROP\nCOMMIT\n"
            f"*nat\n-A OUTPUT -p tcp -m addrtype ! --dst-type LOCAL -m mark ! --mark {PROXY_MARK:#x} "
            "-j REDIRECT --to-ports 9\n"
            "-A POSTROUTING -s 10.0.1.0/24 -o v0 -j MASQUERADE\nCOMMIT\n"
        )
        _run(["ip", "netns", "exec", ns, "iptables-restore"], stdin=rules)
    except NetLabError as e:
        return f"netlab's tools do not work here: {e}"
    return None


def _helper_env() -> dict[str, str]:
    """The environment of netlab's own helper processes (`python -m hivecli.netlab.X`): importable
    from this source tree even where hivecli is not installed."""
    path = os.pathsep.join(p for p in (_SOURCE_ROOT, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


@functools.lru_cache(maxsize=1)
def latency_unavailable() -> str | None:
    """None when `NetLab.set_latency` works here, else one sentence saying why not.

    Tries it in a scratch namespace: an NFQUEUE rule, and a delay line binding its queue
    (nfnetlink_queue). The answer is cached for the life of the process.
    """
    reason = netlab_unavailable()
    if reason is not None:
        return reason
    try:
        with _scratch_namespace() as ns:
            _run(["ip", "netns", "exec", ns, "iptables-restore"], stdin="*mangle\n-A PREROUTING -j NFQUEUE\nCOMMIT\n")
            argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "hivecli.netlab.latency", "--delay-ms", "1"]
            pipe = subprocess.PIPE
            proc = subprocess.Popen(argv, stdout=pipe, stderr=pipe, env=_helper_env())
            try:
                _read_line(proc.stdout, time.monotonic() + COMMAND_TIMEOUT, "a delay line to bind its queue")
            except NetLabError:
                proc.kill()
                stderr = proc.communicate()[1].decode(errors="replace").strip()
                return f"netlab's delay line cannot bind a netfilter queue here: {stderr or 'no output'}"
            _stop_process(proc, STOP_GRACE)
    except NetLabError as e:
        return f"netlab's latency needs the NFQUEUE target and nfnetlink_queue: {e}"
    return None


class Node:
    """A host or NAT router of a NetLab: one network namespace, `ns`, with its uplink `link` ("eth0").

    `ip` is its address on the segment it hangs off (for a router, the internet side);
    `addresses` lists all of them (a router's LAN gateway too). Made by `NetLab.host` and
    `NetLab.nat_router`, not directly.
    """

    def __init__(self, lab: NetLab, name: str, index: int, ip: str, behind: Node | None, kind: str) -> None:
        self.lab, self.name, self.index, self.ip, self.behind, self.kind = lab, name, index, ip, behind, kind
        self.ns = f"{lab.prefix}-{name}"
        self.link = "eth0"
        # the other end of the uplink: a port of the switch's bridge, or of the router's LAN bridge
        self.peer_ns = behind.ns if behind is not None else lab.switch_ns
        self.peer_link = f"p{index}"
        self.addresses = [ip]
        self.lan: str | None = None  # a router's private network, "10.N.K.0/24"; it is 10.N.K.1 there
        self.lan_index = 0
        self.lan_hosts = 0
        self.rate_mbit: float | None = None
        self.loss_percent = 0.0
        self.delay_ms = 0.0
        self.latency_ms = 0.0
        self.latency: subprocess.Popen[bytes] | None = None  # the delay line, while a latency is set
        self.latency_queue = 0
        self.blocked: set[str] = set()  # addresses partitioned away from this node
        self.proxy: subprocess.Popen[bytes] | None = None  # the delay proxy, while a delay is set
        self.proxy_port = 0

    def popen(self, argv: Sequence[Any], **kwargs: Any) -> subprocess.Popen[Any]:
        """`subprocess.Popen` of `argv` inside this namespace; the lab stops and reaps it at close.

        The process gets a session (and process group) of its own unless `start_new_session` is
        given, so that close() also reaches the children it starts.

        Raises:
            NetLabError: the lab is closed.
            OSError: as subprocess.Popen.
        """
        return self.lab._popen(self, argv, **kwargs)

    def run(
        self, argv: Sequence[Any], *, check: bool = True, timeout: float | None = None, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """`subprocess.run` of `argv` inside this namespace; output captured as text unless told otherwise.

        Raises:
            NetLabError: `check` and the command exited non-zero (the message has its stderr).
            subprocess.TimeoutExpired: it ran longer than `timeout` seconds (it is killed).
        """
        kwargs.setdefault("capture_output", "stdout" not in kwargs and "stderr" not in kwargs)
        kwargs.setdefault("text", True)
        full = ["ip", "netns", "exec", self.ns, *map(str, argv)]
        proc = subprocess.run(full, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            stderr = proc.stderr if isinstance(proc.stderr, str) else (proc.stderr or b"").decode(errors="replace")
            raise NetLabError(
                f"`{shlex.join(full)}` exited with {proc.returncode}: {stderr.strip() or '(no stderr)'}",
                full,
                proc.returncode,
                stderr,
            )
        return proc

    def __repr__(self) -> str:
        extras = [f"behind={self.behind.name!r}"] if self.behind is not None else []
        extras += [f"lan={self.lan}"] if self.lan else []
        extras += [f"rate={self.rate_mbit:g}mbit"] if self.rate_mbit else []
        extras += [f"loss={self.loss_percent:g}%"] if self.loss_percent else []
        extras += [f"delay={self.delay_ms:g}ms"] if self.delay_ms else []
        extras += [f"latency={self.latency_ms:g}ms"] if self.latency_ms else []
        extras += [f"blocked={sorted(self.blocked)}"] if self.blocked else []
        return f"Node({self.name!r}, {self.kind}, ns={self.ns!r}, ip={self.ip!r}{''.join(', ' + e for e in extras)})"


class NetLab:
    """Network namespaces joined by an emulated internet; see the module docstring.

    Args:
        stop_grace: seconds a process the lab started gets between SIGTERM and SIGKILL at close.

    Raises:
        NetLabError: the switch namespace could not be built (see `netlab_unavailable()`).

    Every method that takes a node raises ValueError for a node of another lab, and every method
    but close() raises NetLabError once the lab is closed.
    """

    def __init__(self, *, stop_grace: float = STOP_GRACE) -> None:
        self.stop_grace = stop_grace
        self.nodes: dict[str, Node] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False
        self._internet_hosts = 0
        self._lans = 0
        existing = _namespaces()
        while True:  # a prefix no namespace uses yet; its /16 is drawn with it, for readable addresses
            self.prefix = f"hl{random.getrandbits(16):04x}"
            if not any(ns.startswith(self.prefix + "-") for ns in existing):
                break
        self.net = random.randint(64, 127)  # addresses are 10.<net>.x.y, whichever lab they are in
        self.switch_ns = f"{self.prefix}-{SWITCH}"
        atexit.register(self.close)
        try:
            self._add_namespace(self.switch_ns)
            self._ip(self.switch_ns, "link", "add", "br0", "type", "bridge")
            self._ip(self.switch_ns, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._procs)} processes"
        return f"NetLab({self.prefix!r}, net=10.{self.net}.0.0/16, nodes={list(self.nodes)}, {state})"

    # ---- building ------------------------------------------------------------------------------

    def host(self, name: str, *, rate_mbit: float | None = None, behind: Node | None = None) -> Node:
        """A host on the internet segment, or on `behind`'s private LAN (then reachable only through its NAT).

        Raises:
            ValueError: a bad or duplicate name, `behind` not a router of this lab, or no addresses left.
            NetLabError: a command failed (the half-built host is removed).
        """
        if behind is not None and (behind.lab is not self or behind.kind != "router"):
            raise ValueError(f"behind={behind!r} is not a NAT router of this lab")
        return self._add_node(name, "host", behind, rate_mbit)

    def nat_router(self, name: str, *, rate_mbit: float | None = None) -> Node:
        """A router on the internet segment with a private LAN behind it, masqueraded out of its internet leg.

        Raises:
            ValueError: a bad or duplicate name, or no addresses left.
            NetLabError: a command failed (the half-built router is removed).
        """
        return self._add_node(name, "router", None, rate_mbit)

    def _add_node(self, name: str, kind: str, behind: Node | None, rate_mbit: float | None) -> Node:
        self._check_open()
        if not _NAME.fullmatch(name) or name == SWITCH:
            raise ValueError(f"node name {name!r}: use 1-20 of a-z 0-9 _ - (not {SWITCH!r})")
        if name in self.nodes:
            raise ValueError(f"node {name!r} already exists in {self!r}")
        if behind is None:
            if self._internet_hosts >= 253:
                raise ValueError("the internet segment is full (253 nodes)")
            ip = f"10.{self.net}.0.{self._internet_hosts + 1}"
        else:
            if behind.lan_hosts >= 252:
                raise ValueError(f"{behind.name}'s LAN is full (252 hosts)")
            ip = f"10.{self.net}.{behind.lan_index}.{behind.lan_hosts + 2}"  # .1 is the router
        if kind == "router" and self._lans >= 255:
            raise ValueError("no private LANs left (255)")
        node = Node(self, name, len(self.nodes) + 1, ip, behind, kind)
        self._add_namespace(node.ns)
        try:
            self._ip(
                *(node.ns, "link", "add", node.link, "netns", node.ns, "type", "veth"),
                *("peer", "name", node.peer_link, "netns", node.peer_ns),
            )
            self._ip(node.peer_ns, "link", "set", node.peer_link, "master", "br0" if behind is None else "lan", "up")
            self._ip(node.ns, "addr", "add", f"{ip}/24", "dev", node.link)
            self._ip(node.ns, "link", "set", node.link, "up")
            if behind is not None:
                self._ip(node.ns, "route", "add", "default", "via", behind.addresses[1])
            nat = ""
            if kind == "router":
                node.lan_index = self._lans + 1
                node.lan = f"10.{self.net}.{node.lan_index}.0/24"
                node.addresses.append(f"10.{self.net}.{node.lan_index}.1")
                self._ip(node.ns, "link", "add", "lan", "type", "bridge")
                self._ip(node.ns, "addr", "add", f"{node.addresses[1]}/24", "dev", "lan")
                self._ip(node.ns, "link", "set", "lan", "up")
                _enable_forwarding(node.ns)
                nat = f"-A POSTROUTING -s {node.lan} -o {node.link} -j MASQUERADE\n"
            # netlab's own chains, hooked in once; partition, loss and delay rewrite their contents
            self._iptables(
                node,
                f"*filter\n:{PART_CHAIN} - [0:0]\n"
                + "".join(f"-A {hook} -j {PART_CHAIN}\n" for hook in ("INPUT", "FORWARD", "OUTPUT"))
                + f"COMMIT\n*mangle\n:{LOSS_CHAIN} - [0:0]\n:{LATENCY_CHAIN} - [0:0]\n"
                f"-A PREROUTING -i {node.link} -j {LOSS_CHAIN}\n-A PREROUTING -i {node.link} -j {LATENCY_CHAIN}\n"
                f"-A POSTROUTING -o {node.link} -j {LOSS_CHAIN}\nCOMMIT\n"
                f"*nat\n:{DELAY_CHAIN} - [0:0]\n-A OUTPUT -j {DELAY_CHAIN}\n{nat}COMMIT\n",
            )
            if rate_mbit:
                self._shape(node, rate_mbit)
        except BaseException:
            with contextlib.suppress(NetLabError):
                self._delete_namespace(node.ns)
            raise
        if behind is None:
            self._internet_hosts += 1
        else:
            behind.lan_hosts += 1
        if kind == "router":
            self._lans += 1
        self.nodes[name] = node
        return node

    # ---- shaping -------------------------------------------------------------------------------

    def set_rate(self, node: Node, mbit: float | None) -> None:
        """Limit `node`'s link to `mbit` Mbit/s in each direction (tc tbf on both ends); None or 0 removes it.

        Raises:
            ValueError: a negative rate.
            NetLabError: tc failed.
        """
        self._check_node(node)
        if mbit is not None and mbit < 0:
            raise ValueError(f"mbit = {mbit}: must be >= 0")
        if mbit:
            self._shape(node, mbit)
        elif node.rate_mbit:
            for ns, dev in ((node.ns, node.link), (node.peer_ns, node.peer_link)):
                _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"])
            node.rate_mbit = None

    def _shape(self, node: Node, mbit: float) -> None:
        # burst: 5 ms of traffic, at least 32 KiB so that one TSO segment passes whole; queue: 25 ms
        burst = max(32 * 1024, int(mbit * 1e6 / 8 * 0.005))
        for ns, dev in ((node.ns, node.link), (node.peer_ns, node.peer_link)):
            tbf = ["tbf", "rate", f"{mbit:g}mbit", "burst", str(burst), "latency", "25ms"]
            _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *tbf])
        node.rate_mbit = mbit

    def set_loss(self, node: Node, percent: float) -> None:
        """Drop `percent` % of the packets on `node`'s link, each direction, at random; 0 removes the loss.

        Raises:
            ValueError: `percent` outside 0..100.
            NetLabError: iptables failed.
        """
        self._check_node(node)
        if not 0 <= percent <= 100:
            raise ValueError(f"percent = {percent}: must be within 0..100")
        if percent >= 100:
            rule = f"-A {LOSS_CHAIN} -j DROP\n"
        elif percent > 0:
            rule = f"-A {LOSS_CHAIN} -m statistic --mode random --probability {percent / 100:.6f} -j DROP\n"
        else:
            rule = ""
        self._iptables(node, f"*mangle\n:{LOSS_CHAIN} - [0:0]\n{rule}COMMIT\n")
        node.loss_percent = float(percent)

    def set_delay(self, node: Node, rtt_ms: float, *, timeout: float = 30.0) -> None:
        """Add `rtt_ms` of round-trip time to every TCP connection `node` opens from now on; 0 removes it.

        Changing or removing a delay resets the connections opened through the previous one.

        Raises:
            ValueError: a negative delay.
            NetLabError: the proxy did not start listening within `timeout` seconds, or iptables failed.
        """
        self._check_node(node)
        if rtt_ms < 0:
            raise ValueError(f"rtt_ms = {rtt_ms}: must be >= 0")
        new, rule = None, ""
        if rtt_ms > 0:
            new = self._start_proxy(node, rtt_ms, timeout)
            # every TCP connection the node opens, except to its own addresses and except the proxy's
            # own (marked) ones, goes to the proxy; the port was printed by the proxy
            rule = (
                f"-A {DELAY_CHAIN} -p tcp -m addrtype ! --dst-type LOCAL -m mark ! --mark {PROXY_MARK:#x} "
                f"-j REDIRECT --to-ports {node.proxy_port}\n"
            )
        node.proxy = self._swap(node, node.proxy, new, f"*nat\n:{DELAY_CHAIN} - [0:0]\n{rule}COMMIT\n")
        node.delay_ms = float(rtt_ms)

    def set_latency(self, node: Node, ms: float, *, timeout: float = 30.0) -> None:
        """Hold every packet that arrives on `node`'s link `ms` milliseconds; 0 removes it.

        Applies to every protocol and every connection, whichever side opened it; a round trip
        between two nodes takes the sum of their latencies more. Changing it keeps connections up
        (the packets held so far go at once).

        Raises:
            ValueError: a negative latency.
            NetLabError: the delay line did not bind its queue within `timeout` seconds (the
                kernel lacks nfnetlink_queue or the NFQUEUE target), or iptables failed.
        """
        self._check_node(node)
        if ms < 0:
            raise ValueError(f"ms = {ms}: must be >= 0")
        new, rule = None, ""
        queue = 1 - node.latency_queue if node.latency is not None else 0  # the old line keeps its own till the switch
        if ms > 0:
            new = self._start_latency(node, ms, queue, timeout)
            rule = f"-A {LATENCY_CHAIN} -j NFQUEUE --queue-num {queue}\n"
        node.latency = self._swap(node, node.latency, new, f"*mangle\n:{LATENCY_CHAIN} - [0:0]\n{rule}COMMIT\n")
        node.latency_ms = float(ms)
        node.latency_queue = queue  # only now: had the rule failed, the old line would still hold its queue

    def _swap(
        self, node: Node, old: subprocess.Popen[bytes] | None, new: subprocess.Popen[bytes] | None, rules: str
    ) -> subprocess.Popen[bytes] | None:
        """Write `rules` (iptables-restore) that point `node`'s traffic at helper `new` instead of
        `old`, then stop `old` (the delay proxy, which new connections no longer reach; the delay
        line, which lets what it holds go). Returns the helper now in use: `new`.

        Raises:
            NetLabError: iptables failed; `new` is stopped and `old` stays in use.
        """
        try:
            self._iptables(node, rules)
        except BaseException:
            if new is not None:
                self.stop(new)
            raise
        if old is not None:
            self.stop(old)
        return new

    def _start_latency(self, node: Node, ms: float, queue: int, timeout: float) -> subprocess.Popen[bytes]:
        """A delay line in `node`'s namespace, bound to netfilter queue `queue`.

        Raises:
            NetLabError: it did not report its queue bound within `timeout` seconds.
        """
        args = ["--queue", str(queue), "--delay-ms", f"{ms:g}"]
        return self._start_helper(node, "latency", args, "the delay line", "to bind its queue", timeout)[0]

    def _start_proxy(self, node: Node, rtt_ms: float, timeout: float) -> subprocess.Popen[bytes]:
        """A delay proxy in `node`'s namespace, listening (its port in `node.proxy_port`).

        Raises:
            NetLabError: it did not report listening within `timeout` seconds.
        """
        args = ["--port", "0", "--delay-ms", f"{rtt_ms:g}", "--mark", f"{PROXY_MARK:#x}"]
        if node.rate_mbit:  # hold what the shaped link carries in the added round trip, as a real path would
            args += ["--buffer", str(max(PROXY_MIN_BUFFER, int(node.rate_mbit * 1e6 / 8 * rtt_ms / 1000)))]
        proc, line = self._start_helper(node, "proxy", args, "the delay proxy", "to listen", timeout)
        try:
            node.proxy_port = int(json.loads(line)["port"])
        except BaseException:
            self.stop(proc)
            raise
        return proc

    def _start_helper(
        self, node: Node, module: str, args: list[str], what: str, until: str, timeout: float
    ) -> tuple[subprocess.Popen[bytes], str]:
        """`python -m hivecli.netlab.<module> <args>` in `node`'s namespace, and the first line it
        printed (it prints one once it is ready).

        Raises:
            NetLabError: no line within `timeout` seconds (the process is stopped).
        """
        argv = [sys.executable, "-m", f"hivecli.netlab.{module}", *args]
        proc = self._popen(node, argv, stdout=subprocess.PIPE, env=_helper_env())
        try:
            line = _read_line(proc.stdout, time.monotonic() + timeout, f"{what} in {node.ns} {until}")
        except BaseException:
            self.stop(proc)
            raise
        return proc, line

    # ---- failures ------------------------------------------------------------------------------

    def partition(self, *groups: Iterable[Node]) -> None:
        """Drop every packet between members of different groups, in both directions, until `heal()`.

        Rules go in the members' namespaces and match the other groups' addresses; a router in a
        group takes its LAN with it. Nodes in no group are unaffected. Partitions add up.

        Raises:
            ValueError: fewer than two groups, or a node in two groups or of another lab.
            NetLabError: iptables failed.
        """
        sets = [list(g) for g in groups]
        if len(sets) < 2:
            raise ValueError("partition needs at least two groups")
        members = [n for g in sets for n in g]
        if len({id(n) for n in members}) != len(members):
            raise ValueError("a node is in more than one group")
        for n in members:
            self._check_node(n)
        for i, group in enumerate(sets):
            others = {addr for j, g in enumerate(sets) if j != i for n in g for addr in n.addresses}
            for n in group:
                n.blocked |= others
                self._write_partition(n)

    def isolate(self, node: Node) -> None:
        """Cut `node` off from every other node of the lab until `heal()`.

        Raises:
            NetLabError: iptables failed.
        """
        self.partition([node], [n for n in self.nodes.values() if n is not node])

    def heal(self) -> None:
        """Remove every partition and isolation.

        Raises:
            NetLabError: iptables failed.
        """
        self._check_open()
        for n in self.nodes.values():
            if n.blocked:
                n.blocked.clear()
                self._write_partition(n)

    def _write_partition(self, node: Node) -> None:
        rules = []
        for addr in sorted(node.blocked):
            # --ctorigdst: a connection redirected to the delay proxy is addressed to 127.0.0.1 by
            # now; matching its original destination makes its connect time out as it would
            # without the proxy (and cuts its established connections too)
            rules += [f"-A {PART_CHAIN} -s {addr} -j DROP", f"-A {PART_CHAIN} -d {addr} -j DROP"]
            rules += [f"-A {PART_CHAIN} -m conntrack --ctorigdst {addr} -j DROP"]
        self._iptables(node, f"*filter\n:{PART_CHAIN} - [0:0]\n" + "".join(r + "\n" for r in rules) + "COMMIT\n")

    # ---- processes -----------------------------------------------------------------------------

    def _popen(self, node: Node, argv: Sequence[Any], **kwargs: Any) -> subprocess.Popen[Any]:
        self._check_node(node)
        kwargs.setdefault("start_new_session", True)  # its own process group: close() reaches its children
        proc = subprocess.Popen(["ip", "netns", "exec", node.ns, *map(str, argv)], **kwargs)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], grace: float | None = None) -> int:
        """SIGTERM `proc` and its process group, SIGKILL after `grace` seconds, reap it; returns its exit code.

        Raises:
            ValueError: `proc` was not started by this lab.
        """
        if not any(p is proc for p in self._procs):
            raise ValueError(f"{proc!r} was not started by {self!r}")
        self._procs = [p for p in self._procs if p is not proc]
        return _stop_process(proc, self.stop_grace if grace is None else grace)

    # ---- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process the lab started and delete its namespaces; safe to call twice.

        Raises:
            NetLabError: some process could not be stopped or some namespace deleted (the rest still are).
        """
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        procs, self._procs = self._procs, []
        failures = []
        for proc in reversed(procs):
            try:
                _stop_process(proc, self.stop_grace)
            except OSError as e:  # e.g. reaped behind our back; the namespaces must go regardless
                failures.append(f"stopping {proc.args!r}: {e}")
        for node in self.nodes.values():
            node.proxy = node.latency = None
        for ns in reversed(list(self._namespaces)):
            try:
                self._delete_namespace(ns)
            except NetLabError as e:
                failures.append(str(e))
        if failures:
            raise NetLabError(f"closing {self.prefix}: " + "; ".join(failures))

    # ---- helpers -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise NetLabError(f"{self!r} is closed")

    def _check_node(self, node: Node) -> None:
        self._check_open()
        if node.lab is not self or self.nodes.get(node.name) is not node:
            raise ValueError(f"{node!r} is not a node of {self!r}")

    def _add_namespace(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        self._ip(ns, "link", "set", "lo", "up")

    def _delete_namespace(self, ns: str) -> None:
        # the veth pairs go with it; the processes were stopped first, or it would linger unnamed
        _run(["ip", "netns", "del", ns])
        self._namespaces.remove(ns)

    def _ip(self, ns: str, *args: str) -> None:
        _run(["ip", "-n", ns, *args])

    def _iptables(self, node: Node, rules: str) -> None:
        # --noflush: only the chains declared in `rules` are emptied and rewritten, atomically
        _run(["ip", "netns", "exec", node.ns, "iptables-restore", "--noflush"], stdin=rules)


def _stop_process(proc: subprocess.Popen[Any], grace: float) -> int:
    """SIGTERM, then SIGKILL after `grace` seconds, to `proc` (its whole group if it leads one); reap it."""
    if proc.returncode is None:
        # until we reap it, its pid (and group id) cannot be reused, so signalling the group is safe
        pidfd = os.pidfd_open(proc.pid)
        try:
            group = os.getpgid(proc.pid) == proc.pid
        except ProcessLookupError:
            group = False
        try:
            _signal(proc.pid, group, signal.SIGTERM)
            select.select([pidfd], [], [], grace)  # readable once it has exited
            _signal(proc.pid, group, signal.SIGKILL)  # if it ignored SIGTERM, and any children it left
        finally:
            os.close(pidfd)
        proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    return proc.returncode


def _signal(pid: int, group: bool, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)


def _read_line(stream: Any, deadline: float, what: str) -> str:
    """One line from a child's stdout pipe, waiting at most until `deadline` (time.monotonic()).

    Raises:
        NetLabError: no full line before the deadline, or the pipe closed.
    """
    buffer = b""
    fd = stream.fileno()
    while not buffer.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise NetLabError(f"timed out waiting for {what}")
        chunk = os.read(fd, 1)  # byte by byte: nothing after the line may be consumed from the pipe
        if not chunk:
            raise NetLabError(f"{what}: the process closed its stdout ({buffer!r} so far)")
        buffer += chunk
    return buffer.decode()
