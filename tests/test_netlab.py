"""hivecli.netlab: namespaces, NAT, partitions, loss, rate limits, latency and the delaying proxy (needs root)."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hivecli.netlab import PROXY_MIN_BUFFER, NetLab, Node, latency_unavailable, netlab_unavailable

PORT = 7000
# A threaded TCP server; the first line a client sends picks what it does:
#   "peer": answers the client's address as the server sees it; "echo": echoes lines;
#   "sink N": reads N bytes, then answers "ok"; "source N": sends N bytes.
SERVER = r"""
import socket, sys, threading

def handle(conn, addr):
    with conn:
        f = conn.makefile("rb")
        cmd = f.readline().split()
        if cmd[0] == b"peer":
            conn.sendall(addr[0].encode() + b"\n")
        elif cmd[0] == b"echo":
            for line in f:
                conn.sendall(line)
        elif cmd[0] == b"sink":
            left = int(cmd[1])
            while left > 0:
                data = f.read1(min(left, 1 << 20))
                if not data:
                    return
                left -= len(data)
            conn.sendall(b"ok\n")
        elif cmd[0] == b"source":
            left, block = int(cmd[1]), bytes(1 << 20)
            while left > 0:
                conn.sendall(block[: min(left, len(block))])
                left -= min(left, len(block))

server = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=64)
print("ready", flush=True)
while True:
    conn, addr = server.accept()
    threading.Thread(target=handle, args=(conn, addr), daemon=True).start()
"""
# One client exchange; prints a JSON object: "error" if connecting or talking failed, else the results.
CLIENT = r"""
import json, socket, struct, sys, time
host, port, cmd, arg, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
out = {}
try:
    start = time.perf_counter()
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out["connect_s"] = time.perf_counter() - start
    f = s.makefile("rb")
    if cmd == "peer":
        s.sendall(b"peer\n")
        out["peer"] = f.readline().decode().strip()
    elif cmd == "ping":
        s.sendall(b"echo\n")
        out["rtts"] = []
        for _ in range(arg):
            t = time.perf_counter()
            s.sendall(b"x\n")
            assert f.readline() == b"x\n"
            out["rtts"].append(time.perf_counter() - t)
        out["tcp_rtt_us"] = struct.unpack_from("I", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 68)[0]
    elif cmd == "send":
        t, left, block = time.perf_counter(), arg, bytes(1 << 20)
        s.sendall(f"sink {arg}\n".encode())
        while left > 0:
            s.sendall(block[: min(left, len(block))])
            left -= min(left, len(block))
        out["written_s"] = time.perf_counter() - t  # the last write returned: the rest is in buffers on the way
        assert f.readline() == b"ok\n"
        out["seconds"] = time.perf_counter() - t
    elif cmd == "recv":
        t, left = time.perf_counter(), arg
        s.sendall(f"source {arg}\n".encode())
        while left > 0:
            data = f.read1(min(left, 1 << 20))
            assert data, "server closed early"
            left -= len(data)
        out["seconds"] = time.perf_counter() - t
    s.close()
except OSError as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


@pytest.fixture
def lab() -> Iterator[NetLab]:
    reason = netlab_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with NetLab(stop_grace=2.0) as lab:
        yield lab


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next line `proc` prints, within `timeout` seconds (its stdout must be a text pipe)."""
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], timeout)[0]:
        raise TimeoutError(f"no output from {proc.args} within {timeout} s")
    return proc.stdout.readline()


def _serve(node: Node, port: int = PORT) -> subprocess.Popen[str]:
    """The test server in `node`, listening on `port` once this returns."""
    proc = node.popen([sys.executable, "-c", SERVER, port], stdout=subprocess.PIPE, text=True)
    assert _read_line(proc, timeout=20) == "ready\n"
    return proc


def _client(node: Node, host: str, cmd: str, arg: int = 0, timeout: float = 5.0, port: int = PORT) -> dict[str, Any]:
    """Run one CLIENT exchange from `node` to host:port and return what it printed."""
    proc = node.run([sys.executable, "-c", CLIENT, host, port, cmd, arg, timeout], timeout=timeout + 60)
    return json.loads(proc.stdout)


def test_two_hosts_exchange_tcp(lab: NetLab) -> None:
    a, b = lab.host("a"), lab.host("b")
    assert a.ip != b.ip and a.ip.startswith(f"10.{lab.net}.0.")
    _serve(b)
    assert _client(a, b.ip, "peer") == {"connect_s": pytest.approx(0, abs=1), "peer": a.ip}
    assert len(_client(a, b.ip, "ping", 3)["rtts"]) == 3
    assert repr(a).startswith("Node('a', host, ns=") and lab.prefix in repr(lab)


def test_nat_router_lets_its_hosts_out_and_nobody_in(lab: NetLab) -> None:
    a, r = lab.host("a"), lab.nat_router("r")
    c = lab.host("c", behind=r)
    assert r.lan is not None and c.ip.startswith(r.lan.rsplit(".", 1)[0] + ".")
    _serve(a)
    _serve(c)
    assert _client(c, a.ip, "peer")["peer"] == r.ip  # masqueraded: a sees the router
    # the private address has no route from outside, and the router forwards nothing inwards
    assert "unreachable" in _client(a, c.ip, "peer", timeout=2)["error"]
    assert "error" in _client(a, r.ip, "peer", timeout=2)


def test_partition_blocks_and_heal_restores(lab: NetLab) -> None:
    a, b, c = lab.host("a"), lab.host("b"), lab.host("c")
    for node in (a, b):
        _serve(node)
    lab.set_delay(a, 10)  # a's connections go through its proxy: the partition must stop them as well
    lab.partition([a], [b, c])
    assert "timed out" in _client(a, b.ip, "peer", timeout=1)["error"]
    assert "timed out" in _client(c, a.ip, "peer", timeout=1)["error"]
    assert _client(c, b.ip, "peer")["peer"] == c.ip  # inside one group, all is well
    lab.heal()
    assert _client(a, b.ip, "peer")["peer"] == a.ip
    lab.isolate(b)
    assert "timed out" in _client(a, b.ip, "peer", timeout=1)["error"]
    assert _client(c, a.ip, "peer")["peer"] == c.ip
    lab.heal()
    assert _client(b, a.ip, "peer")["peer"] == b.ip


def test_delay_adds_round_trip_time_and_keeps_throughput(lab: NetLab) -> None:
    a, b = lab.host("a"), lab.host("b")
    _serve(b)
    direct = min(_client(a, b.ip, "ping", 5)["rtts"])
    lab.set_delay(a, 200)
    rtts = _client(a, b.ip, "ping", 3)["rtts"]
    assert min(rtts) >= 0.2, rtts  # a lower bound by construction: every chunk waits rtt/2 each way
    assert _client(a, b.ip, "peer")["peer"] == a.ip  # the proxy dials from a's own address
    _serve(a)
    assert min(_client(b, a.ip, "ping", 3)["rtts"]) < 0.2  # b dials a: only a's own connections are delayed
    lab.set_delay(a, 20)
    size = 200 * 2**20
    sent, received = _client(a, b.ip, "send", size, timeout=60), _client(a, b.ip, "recv", size, timeout=60)
    rtts = _client(a, b.ip, "ping", 3)["rtts"]
    lab.set_delay(a, 0)
    plain = _client(a, b.ip, "send", size, timeout=60)
    print(
        f"\nproxy: direct RTT {direct * 1e3:.2f} ms; with 20 ms set, RTT {min(rtts) * 1e3:.2f} ms, "
        f"{size / sent['seconds'] / 1e6:.0f} MB/s out, {size / received['seconds'] / 1e6:.0f} MB/s in "
        f"(no proxy: {size / plain['seconds'] / 1e6:.0f} MB/s)"
    )
    assert min(rtts) >= 0.02
    assert min(_client(a, b.ip, "ping", 3)["rtts"]) < 0.02  # removed


def test_latency_holds_every_packet_a_node_receives_and_tcp_sees_the_whole_round_trip(lab: NetLab) -> None:
    """Unlike the proxy, the latency is on the path: both directions and both dialling sides
    wait, and the sender's own TCP measures the round trip (tcpi_rtt), as it would on a real one."""
    if (reason := latency_unavailable()) is not None:
        pytest.skip(reason)
    a, b = lab.host("a", rate_mbit=50), lab.host("b")
    _serve(a), _serve(b)
    lab.set_latency(a, 30)
    lab.set_latency(b, 20)
    assert "latency=30ms" in repr(a)
    for client, server in ((a, b), (b, a)):
        out = _client(client, server.ip, "ping", 3)
        assert min(out["rtts"]) >= 0.05, out  # a lower bound by construction: 30 + 20 ms held
        assert out["tcp_rtt_us"] >= 40_000, out  # smoothed over the handshake and 3 round trips
    size = 8 * 2**20  # through a 50 Mbit/s link: every byte arrives, in order (the server counts them)
    sent, received = _client(a, b.ip, "send", size, timeout=60), _client(a, b.ip, "recv", size, timeout=60)
    assert "error" not in sent and "error" not in received, (sent, received)
    old = a.latency
    lab.set_latency(a, 5)  # a new delay line on the other queue; the old one is stopped
    assert old is not None and old.poll() is not None and a.latency is not None and a.latency.poll() is None
    assert min(_client(b, a.ip, "ping", 3)["rtts"]) >= 0.025
    lab.set_latency(a, 0)
    lab.set_latency(b, 0)
    assert a.latency is None and b.latency is None and "latency" not in repr(a)
    assert "NFQUEUE" not in a.run(["iptables", "-t", "mangle", "-S", "NETLAB-LATENCY"]).stdout
    rtts = _client(a, b.ip, "ping", 3)["rtts"]
    print(
        f"\nlatency: {size / sent['seconds'] / 1e6:.1f} MB/s out and {size / received['seconds'] / 1e6:.1f} MB/s "
        f"in through 50 Mbit/s with 50 ms; after removal, RTT {min(rtts) * 1e3:.2f} ms"
    )
    assert min(rtts) < 0.025  # removed: the 25 ms of the last setting are gone


def test_a_shaped_nodes_proxy_holds_about_what_its_link_carries_in_the_delay(lab: NetLab) -> None:
    """A real path holds its rate x its delay; a proxy that held megabytes per connection would
    take a sender's bytes (and acknowledge them) seconds before they cross the link."""
    a, b = lab.host("a", rate_mbit=20), lab.host("b")
    _serve(b)
    lab.set_delay(a, 20)
    size = 16 * 2**20  # about 7 s at 20 Mbit/s
    out = _client(a, b.ip, "send", size, timeout=60)
    rate = 20e6 / 8
    ahead = (out["seconds"] - out["written_s"]) * rate  # what was still on its way when the last write returned
    wmem = int(a.run(["cat", "/proc/sys/net/ipv4/tcp_wmem"]).stdout.split()[2])  # the sender's own buffer, at most
    # the proxy's queue and writer hold PROXY_MIN_BUFFER each, its two sockets about twice that (the
    # kernel doubles a size set): 6 of them, and 10 more for the link's queue and the kernel's slack;
    # measured 5.9-6.1 MiB ahead, against 13.6 MiB when the proxy held a 4 MiB queue, a 1 MiB writer
    # and both sockets' autotuned buffers
    bound = wmem + 16 * PROXY_MIN_BUFFER
    print(f"\nproxy of a 20 Mbit/s node: the sender was {ahead / 2**20:.1f} MiB ahead (bound {bound / 2**20:.1f} MiB)")
    assert out["seconds"] >= 0.7 * size / rate  # physics: the link's rate holds through the proxy
    assert ahead <= bound


def test_rate_limit_slows_a_bulk_transfer_both_ways(lab: NetLab) -> None:
    a, b = lab.host("a"), lab.host("b", rate_mbit=20)
    _serve(b)
    size = 2_500_000  # 1 s at 20 Mbit/s
    for cmd in ("send", "recv"):  # into b, then out of b
        seconds = _client(a, b.ip, cmd, size, timeout=30)["seconds"]
        print(f"\n{cmd} at 20 Mbit/s: {size * 8 / seconds / 1e6:.1f} Mbit/s")
        assert seconds >= 0.7 * size * 8 / 20e6  # physics: a lower bound, whatever the machine's load
    lab.set_rate(b, None)
    assert b.rate_mbit is None and "tbf" not in b.run(["tc", "qdisc", "show", "dev", b.link]).stdout


def test_full_loss_blocks_and_zero_restores(lab: NetLab) -> None:
    a, b = lab.host("a"), lab.host("b")
    _serve(b)
    lab.set_loss(b, 100)
    assert "timed out" in _client(a, b.ip, "peer", timeout=1)["error"]
    lab.set_loss(b, 30)
    assert "DROP" in b.run(["iptables", "-t", "mangle", "-S", "NETLAB-LOSS"]).stdout
    lab.set_loss(b, 0)
    assert _client(a, b.ip, "peer")["peer"] == a.ip


def _gone(pid: int) -> bool:
    """No such process, or only a zombie left for init to reap."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_close_stops_processes_and_deletes_namespaces() -> None:
    reason = netlab_unavailable()
    if reason is not None:
        pytest.skip(reason)
    lab = NetLab(stop_grace=0.5)
    a = lab.host("a")
    # ignores SIGTERM (so it takes the SIGKILL), and leaves a child in its process group
    stubborn = a.popen(
        [
            sys.executable,
            "-c",
            "import signal, subprocess, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "child = subprocess.Popen(['sleep', '300']); print(child.pid, flush=True); signal.pause()",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(_read_line(stubborn, timeout=20))
    lab.set_delay(a, 10)
    if latency_unavailable() is None:
        lab.set_latency(a, 10)
    proxy, latency = a.proxy, a.latency
    assert proxy is not None
    lab.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert lab.prefix not in listed
    assert proxy.returncode == 0  # it exits cleanly on SIGTERM
    assert latency is None or latency.returncode == 0  # and so does the delay line
    assert stubborn.returncode == -9
    deadline = time.monotonic() + 10  # the orphaned child is killed at once, but reaped by init
    while not _gone(child):
        assert time.monotonic() < deadline, f"child {child} still running"
        time.sleep(0.05)
    lab.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        lab.host("b")
