"""`hive doctor`: what a bug report needs to know about this machine and its view of a swarm.

Plain functions returning JSON-ready dicts; `hivecli.cli.doctor_cmd` prints them. Nothing here
imports torch at module level, and nothing changes the machine: kernel settings are only read
and advice is returned as text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hivecli.utils.values import finite

if TYPE_CHECKING:
    from hivecli.dht.node import DHTNode
    from hivecli.net.connection import NetSettings
    from hivecli.net.identity import PeerID
    from hivecli.net.multiaddr import Multiaddr

PING_SAMPLES = 5  # dht.ping round trips per peer: the fastest one gives the RTT and the clock offset
MAX_CLOCK_PEERS = 8  # peers (ADDRESS's included) whose clocks are compared with ours
LONG_LINK_BUFFER = 16 * 1024 * 1024  # TCP buffer caps below this limit one connection on long, fast paths

# sysctl name -> how to parse /proc/sys/<name with dots as slashes>
_KERNEL_SETTINGS: dict[str, str] = {
    "net.ipv4.tcp_slow_start_after_idle": "int",
    "net.ipv4.tcp_congestion_control": "str",
    "net.ipv4.tcp_available_congestion_control": "str",
    "net.core.rmem_max": "int",
    "net.core.wmem_max": "int",
    "net.ipv4.tcp_rmem": "ints",
    "net.ipv4.tcp_wmem": "ints",
}


def system_info() -> dict[str, Any]:
    """The "hive", "python", "platform" and "cpu" sections. Never raises."""
    import hivecli

    affinity = getattr(os, "sched_getaffinity", None)  # Linux only: the cores this process may run on
    try:
        usable = len(affinity(0)) if affinity is not None else os.cpu_count()
    except OSError:
        usable = os.cpu_count()
    return {
        "hive": {"version": hivecli.__version__, "location": str(Path(hivecli.__file__).parent)},
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "description": platform.platform(),
        },
        "cpu": {"count": os.cpu_count(), "usable": usable},
    }


def torch_info() -> dict[str, Any]:
    """The "torch" and "cuda" sections. Imports torch here, not before. Never raises: a missing
    or broken torch comes back as {"installed": False, "error": ...} and an empty CUDA section,
    a CUDA that fails to initialize (driver mismatch) as the CUDA section's "error"."""
    cuda: dict[str, Any] = {"version": None, "available": False, "device_count": 0, "devices": [], "error": None}
    try:
        import torch
    except Exception as e:  # ImportError, or a broken install (OSError on a missing .so, ...)
        error = f"{type(e).__name__}: {e}"
        return {"torch": {"installed": False, "version": None, "threads": None, "error": error}, "cuda": cuda}
    info: dict[str, Any] = {
        "installed": True,
        "version": str(torch.__version__),
        "threads": int(torch.get_num_threads()),
        "error": None,
    }
    cuda["version"] = torch.version.cuda
    try:
        cuda["available"] = bool(torch.cuda.is_available())
        cuda["device_count"] = int(torch.cuda.device_count()) if cuda["available"] else 0
        for index in range(cuda["device_count"]):
            props = torch.cuda.get_device_properties(index)
            cuda["devices"].append(
                {
                    "index": index,
                    "name": str(props.name),
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}",
                }
            )
    except Exception as e:  # a driver mismatch raises here: report it, it is what the bug report needs
        cuda["error"] = f"{type(e).__name__}: {e}"
    return {"torch": info, "cuda": cuda}


def interface_info() -> list[dict[str, Any]]:
    """Every network interface: {"name", "up", "mtu", "speed_mbps", "addresses"} (IPv4 and IPv6
    addresses only; speed 0 or None when the system does not say)."""
    import psutil

    stats = psutil.net_if_stats()
    result = []
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        stat = stats.get(name)
        result.append(
            {
                "name": name,
                "up": bool(stat.isup) if stat else None,
                "mtu": int(stat.mtu) if stat else None,
                "speed_mbps": int(stat.speed) if stat else None,
                "addresses": [a.address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)],
            }
        )
    return result


def announce_info(listen: Multiaddr, announce: list[Multiaddr]) -> list[str]:
    """The addresses a peer listening at `listen` (told to `announce` these, if any) would give
    to everyone, as `Host.visible_maddrs()` picks them before any dial-back (port 0: chosen at start)."""
    from hivecli.net.interfaces import expand_unspecified, local_networks, select_addresses
    from hivecli.net.reachability import UNKNOWN, ReachabilityReport

    direct = list(announce) or expand_unspecified([listen])
    return [str(m) for m in select_addresses(direct, [], ReachabilityReport(UNKNOWN), None, local_networks())]


def port_info(host: str, port: int) -> dict[str, Any]:
    """The "ports" section: {"host", "port", "free", "error", "ephemeral"}. `free` tells whether a
    listener could bind `host`:`port` now (bound as the TCP transport binds, with SO_REUSEADDR,
    and released at once); `ephemeral` is a port the system hands out free right now (None if
    even that fails). Port 0, the default of `hive start`, is always free: a port is picked at start.

    Raises:
        ConfigError: `host` is not an IP address.
    """
    from hivecli._exceptions import ConfigError

    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        raise ConfigError(f"--host {host!r} is not an IP address; use e.g. 0.0.0.0, 127.0.0.1 or ::") from None

    def bind(at: int) -> int:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, at))
            sock.listen(1)  # a port someone else only bound can still fail here
            return int(sock.getsockname()[1])

    result: dict[str, Any] = {"host": host, "port": port, "free": True, "error": None, "ephemeral": None}
    try:
        bind(port)
    except OSError as e:
        result["free"], result["error"] = False, e.strerror or str(e)
    try:
        result["ephemeral"] = bind(0)
    except OSError:
        pass
    return result


def kernel_info(root: str | Path = "/proc/sys") -> dict[str, Any]:
    """The "kernel" section: {"settings": {sysctl name: value or None}, "advice": [line, ...]}.

    Values are read from `root` (ints, a list of ints for tcp_rmem/tcp_wmem, text for the
    congestion control); None where unreadable (not Linux, or a container hiding them).
    """
    settings: dict[str, Any] = {}
    for name, kind in _KERNEL_SETTINGS.items():
        try:
            text = (Path(root) / name.replace(".", "/")).read_text().strip()
            settings[name] = int(text) if kind == "int" else [int(x) for x in text.split()] if kind == "ints" else text
        except (OSError, ValueError):
            settings[name] = None
    return {"settings": settings, "advice": kernel_advice(settings)}


def kernel_advice(settings: dict[str, Any]) -> list[str]:
    """What to change for long links (one sentence and a `sysctl` command each), from `kernel_info` settings."""
    advice = []
    if settings.get("net.ipv4.tcp_slow_start_after_idle") == 1:
        advice.append(
            "net.ipv4.tcp_slow_start_after_idle is 1: TCP shrinks its window after each idle pause (peers compute "
            "between averaging rounds), which costs several round trips per averaging round on long paths; "
            "turn it off: sudo sysctl -w net.ipv4.tcp_slow_start_after_idle=0"
        )
    if settings.get("net.ipv4.tcp_congestion_control") == "bbr":
        advice.append(
            "net.ipv4.tcp_congestion_control is bbr: every 10 s BBR drains each connection to 4 packets for about "
            "0.2 s (PROBE_RTT), and an averaging round waits for its slowest connection (4 peers, 50 ms apart: "
            "2.91 s rounds with such a drain against 2.72 s without); cubic does not: "
            "sudo sysctl -w net.ipv4.tcp_congestion_control=cubic"
        )
    for name, side in (("net.ipv4.tcp_rmem", "receive"), ("net.ipv4.tcp_wmem", "send")):
        value = settings.get(name)
        if isinstance(value, list) and len(value) == 3 and value[2] < LONG_LINK_BUFFER:
            advice.append(
                f"{name} caps a connection's {side} buffer at {value[2] / 2**20:.1f} MiB: over a 100 ms round trip "
                f"one connection moves at most about {value[2] / 0.1 / 1e6:.0f} MB/s; for long fast links raise it: "
                f"sudo sysctl -w {name}='{value[0]} {value[1]} {32 * 2**20}'"
            )
    return advice


SMALL_SHARED_MEMORY = 1 << 30  # /dev/shm with less free than this limits averaging on one host (advice)


def shared_memory_info(directory: str | Path = "/dev/shm") -> dict[str, Any]:
    """The "shared_memory" section: {"directory", "size_bytes", "free_bytes", "advice": [...]}:
    where peers on this host average through shared memory (hivecli.averaging.sharedmem), and
    whether it has room for that. Sizes are None where the directory is missing. Never raises."""
    try:
        space = os.statvfs(directory)
        size, free = space.f_blocks * space.f_frsize, space.f_bavail * space.f_frsize
    except OSError:
        size = free = None
    advice = []
    if free is None:
        advice.append(
            f"{directory} is missing: hive peers on this host average over loopback TCP instead of shared "
            "memory, at about twice the CPU per round"
        )
    elif free < SMALL_SHARED_MEMORY:
        advice.append(
            f"{directory} has only {free / 2**20:.0f} MiB free (a Docker container's default is 64 MB): hive peers "
            "on this host average through it only while their buffers (about the averaged tensors' size each) "
            "fit in half of it, and over loopback TCP (about twice the CPU) otherwise; give the container "
            "more, e.g. docker run --shm-size=8g"
        )
    return {"directory": str(directory), "size_bytes": size, "free_bytes": free, "advice": advice}


def peer_time(response: Any) -> float | None:
    """The `time` field of a peer's dht.ping reply as a finite float, or None if absent or bogus
    (any peer may send anything: a bool, NaN, a string, an integer too large for a float)."""
    return finite(response.get("time")) if isinstance(response, dict) else None


def clock_offset(sent_at: float, rtt: float, their_time: float) -> float:
    """Their clock minus ours, assuming they read their clock halfway through the round trip
    (`sent_at`: our DHT time when the request left; `rtt` in seconds). Positive: theirs is ahead."""
    return their_time - (sent_at + rtt / 2)


async def _ping(node: DHTNode, peer: PeerID | Multiaddr, samples: int, timeout: float) -> dict[str, Any]:
    """`samples` dht.pings on an open connection: the fastest gives the RTT and the clock offset.

    Raises:
        asyncio.TimeoutError, HiveError, ValueError: as `DHTProtocol.request` does.
    """
    from hivecli.utils.timing import get_dht_time

    best: tuple[float, float | None] | None = None  # (rtt, offset)
    for _ in range(samples):
        sent_at, began = get_dht_time(), time.perf_counter()
        response = await node.protocol.request(peer, "dht.ping", {}, timeout)
        rtt = time.perf_counter() - began
        their = peer_time(response)
        if best is None or rtt < best[0]:
            best = (rtt, None if their is None else clock_offset(sent_at, rtt, their))
    assert best is not None
    offset = None if best[1] is None else round(best[1], 6) + 0.0  # + 0.0: no "-0.0"
    return {"rtt_ms": round(best[0] * 1000, 3), "clock_offset_s": offset, "error": None}


async def _diagnose(node: DHTNode, target: Multiaddr, port: int | None, timeout: float) -> dict[str, Any]:
    from hivecli._exceptions import HiveError, PeerUnreachableError
    from hivecli.net.reachability import advice, check_reachability
    from hivecli.utils.loops import timeout as _timeout

    assert target.peer_id is not None
    try:
        async with _timeout(timeout):
            own = await _ping(node, target.peer_id, PING_SAMPLES, timeout)
    except (HiveError, ValueError, asyncio.TimeoutError) as e:
        reason = str(e) or f"no answer within {timeout:g} s"
        raise PeerUnreachableError(f"{target} let us join but then stopped answering: {reason}") from None
    others = [peer for _, peer in node.protocol.routing_table if peer != target.peer_id][: MAX_CLOCK_PEERS - 1]

    async def ping_other(peer: PeerID) -> dict[str, Any]:
        try:  # the first ping also opens the connection; the fastest sample, kept, leaves that out
            async with _timeout(timeout):
                return {"peer_id": str(peer), **await _ping(node, peer, 1 + PING_SAMPLES // 2, timeout)}
        except (HiveError, ValueError, OSError, asyncio.TimeoutError) as e:
            return {"peer_id": str(peer), "rtt_ms": None, "clock_offset_s": None, "error": str(e) or "timed out"}

    pinged = await asyncio.gather(*(ping_other(peer) for peer in others))
    report = await check_reachability(node.host, [target.peer_id], timeout=timeout)
    return {
        "address": str(target),
        "peer_id": str(target.peer_id),
        "status": report.status,
        "advice": advice(report, port, relayed=False),
        "checked": report.to_json(),
        "rtt_ms": own["rtt_ms"],
        "clock_offset_s": own["clock_offset_s"],
        "peers": [{"peer_id": str(target.peer_id), **own}, *pinged],
        "visible": [str(m) for m in node.host.visible_maddrs()],
    }


def probe_peer(
    address: str,
    listen: str = "/ip4/0.0.0.0/tcp/0",
    announce: list[str] | None = None,
    timeout: float = 10.0,
    net_settings: NetSettings | None = None,
) -> dict[str, Any]:
    """Join the DHT of `address` with a temporary node listening at `listen`, then measure:
    whether `address`'s peer can dial us back ("public", "unreachable", "unknown", with the
    advice `hive start` would print), our round trip to it, and the clock offset against it and
    against up to MAX_CLOCK_PEERS - 1 more peers of its DHT (from the `time` of dht.ping replies).
    The node is shut down before returning. Every wait is bounded by `timeout` seconds.

    Returns:
        The "reachability" section: {"address", "peer_id", "status", "advice", "checked" (the
        dial-back report), "rtt_ms", "clock_offset_s", "peers": [{"peer_id", "rtt_ms",
        "clock_offset_s", "error"}], "visible" (the temporary node's addresses)}.

    Raises:
        MultiaddrError: `address` is malformed or lacks /p2p/PEER_ID (a ConfigError).
        ConfigError: cannot listen at `listen`, or a bad `announce` address.
        PeerUnreachableError: nobody answered at `address` within `timeout` (BootstrapError is one).
    """
    from hivecli._exceptions import PeerUnreachableError
    from hivecli.dht.dht import DHT
    from hivecli.dht.settings import DHTSettings
    from hivecli.net.connection import NetSettings
    from hivecli.net.multiaddr import Multiaddr, parse_peer_maddr

    target = parse_peer_maddr(address)
    net = net_settings or NetSettings()
    net = dataclasses.replace(
        net, connect_timeout=min(net.connect_timeout, timeout), handshake_timeout=min(net.handshake_timeout, timeout)
    )
    dht = DHT(
        initial_peers=[target],
        host_maddrs=[listen],
        announce_maddrs=announce or [],
        settings=DHTSettings(wait_timeout=min(3.0, timeout), bootstrap_timeout=timeout),
        net_settings=net,
        startup_timeout=2 * timeout + 5,  # past the bootstrap's own deadline, which says why
    )
    try:
        dht.run_in_background(await_ready=True)  # BootstrapError (a PeerUnreachableError) says why for ADDRESS
    except TimeoutError:
        raise PeerUnreachableError(f"{address} did not let us join its DHT within {timeout:g} s") from None
    try:
        # advice names the port the user asked for: the temporary node's random one would mislead
        port = Multiaddr.parse(listen).port or None
        return dht.run_coroutine(lambda _dht, node: _diagnose(node, target, port, timeout))
    finally:
        dht.shutdown()


__all__ = [
    "announce_info",
    "clock_offset",
    "interface_info",
    "kernel_advice",
    "kernel_info",
    "peer_time",
    "port_info",
    "probe_peer",
    "shared_memory_info",
    "system_info",
    "torch_info",
]
