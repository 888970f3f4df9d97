"""`hive doctor`: the report's fields, the dial-back verdict, round trip and clock offset against real peers."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import hivecli
from hivecli.dht.dht import DHT
from hivecli.doctor import clock_offset, kernel_info, peer_time, port_info, shared_memory_info
from hivecli.net import Identity
from hivecli.net.multiaddr import Multiaddr

HIVE = [sys.executable, "-m", "hivecli.cli.main"]
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def run(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HIVE, *args], capture_output=True, text=True, timeout=timeout)


def doctor_json(*args: str) -> dict[str, Any]:
    result = run("doctor", "--json", *args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that is bound but not listening: connections to it are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@contextlib.contextmanager
def two_peers() -> Iterator[tuple[DHT, DHT]]:
    with (
        DHT(host_maddrs=[LOOPBACK], start=True) as first,
        DHT(initial_peers=first.get_visible_maddrs(), host_maddrs=[LOOPBACK], start=True) as second,
    ):
        yield first, second


def test_json_report_has_the_documented_fields_with_their_types() -> None:
    import torch

    report = doctor_json("--host", "127.0.0.1")
    assert report["hive"]["version"] == hivecli.__version__
    assert report["python"]["version"] == platform.python_version()
    assert report["python"]["executable"] == sys.executable
    assert report["platform"]["system"] == platform.system()
    assert isinstance(report["cpu"]["count"], int) and report["cpu"]["count"] >= 1
    assert report["torch"]["installed"] is True and report["torch"]["error"] is None
    assert report["torch"]["version"] == torch.__version__
    assert isinstance(report["torch"]["threads"], int) and report["torch"]["threads"] >= 1
    cuda = report["cuda"]
    assert cuda["version"] == torch.version.cuda and cuda["available"] is torch.cuda.is_available()
    assert cuda["device_count"] == len(cuda["devices"]) and cuda["error"] is None
    assert all(isinstance(i["name"], str) and isinstance(i["addresses"], list) for i in report["interfaces"])
    assert any("127.0.0.1" in i["addresses"] for i in report["interfaces"])
    assert [Multiaddr.parse(m).host for m in report["announce"]] == ["127.0.0.1"]
    ports = report["ports"]
    assert ports["host"] == "127.0.0.1" and ports["port"] == 0 and ports["free"] is True and ports["error"] is None
    assert isinstance(ports["ephemeral"], int) and 0 < ports["ephemeral"] < 65536
    kernel = report["kernel"]
    assert "net.ipv4.tcp_slow_start_after_idle" in kernel["settings"] and isinstance(kernel["advice"], list)
    if Path("/proc/sys/net/ipv4/tcp_slow_start_after_idle").exists():
        assert kernel["settings"]["net.ipv4.tcp_slow_start_after_idle"] in (0, 1)
    shm = report["shared_memory"]
    assert shm["directory"] == "/dev/shm" and isinstance(shm["advice"], list)
    if Path("/dev/shm").is_dir():
        assert 0 <= shm["free_bytes"] <= shm["size_bytes"]
    assert report["reachability"] is None


def test_shared_memory_room_is_reported_with_advice_where_it_is_small(tmp_path: Path, monkeypatch) -> None:
    roomy = shared_memory_info(tmp_path)
    assert roomy["size_bytes"] >= roomy["free_bytes"] > 0
    monkeypatch.setattr(
        "os.statvfs", lambda path: os.statvfs_result((4096, 4096, 16384, 16000, 16000, 0, 0, 0, 0, 255))
    )
    [small] = shared_memory_info(tmp_path)["advice"]  # 64 MiB, as in a Docker container
    assert "has only 62 MiB free" in small and "--shm-size" in small
    monkeypatch.undo()
    missing = shared_memory_info(tmp_path / "missing")
    assert missing["free_bytes"] is None and "missing" in missing["advice"][0]


def test_text_report_is_one_plain_block() -> None:
    result = run("doctor", "--host", "127.0.0.1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("hive doctor")
    assert f"- python: {platform.python_version()} " in result.stdout
    assert f"- hive: {hivecli.__version__} " in result.stdout
    assert any(line.startswith("- torch: ") and "threads" in line for line in lines)
    assert "- port 127.0.0.1:0: free" in result.stdout
    assert any(line.startswith("- shared memory: /dev/shm") for line in lines)


def test_a_reachable_doctor_is_public_with_round_trip_and_clock_offsets() -> None:
    with two_peers() as (first, second):
        address = str(first.get_visible_maddrs()[0])
        reach = doctor_json(address, "--host", "127.0.0.1", "--timeout", "10")["reachability"]
        assert reach["address"] == address and reach["peer_id"] == str(first.peer_id)
        assert reach["status"] == "public", reach
        assert reach["checked"]["checked_by"] == [str(first.peer_id)] and reach["checked"]["failures"] == []
        assert reach["advice"].startswith("Reachable from other peers at /ip4/127.0.0.1/tcp/")
        assert isinstance(reach["rtt_ms"], float) and 0 < reach["rtt_ms"] < 5000
        offset = reach["clock_offset_s"]
        assert isinstance(offset, float) and math.isfinite(offset) and abs(offset) < 5
        # the other DHT peer was found and its clock compared too
        measured = {p["peer_id"]: p for p in reach["peers"]}
        assert set(measured) == {str(first.peer_id), str(second.peer_id)}
        for peer in measured.values():
            assert peer["error"] is None and abs(peer["clock_offset_s"]) < 5 and peer["rtt_ms"] > 0
        assert [Multiaddr.parse(m).host for m in reach["visible"]] == ["127.0.0.1"]


def test_a_doctor_announcing_a_closed_port_is_unreachable() -> None:
    with DHT(host_maddrs=[LOOPBACK], start=True) as peer, closed_port() as port:
        address = str(peer.get_visible_maddrs()[0])
        report = doctor_json(address, "--host", "127.0.0.1", "--announce", f"127.0.0.1:{port}")
        reach = report["reachability"]
        assert reach["status"] == "unreachable", reach
        assert report["announce"] == [f"/ip4/127.0.0.1/tcp/{port}"]
        assert reach["checked"]["reachable"] == [] and reach["checked"]["observed_host"] == "127.0.0.1"
        assert f"/ip4/127.0.0.1/tcp/{port}" in reach["checked"]["failures"][0]
        assert "Other peers cannot dial this peer" in reach["advice"]
        assert isinstance(reach["clock_offset_s"], float)  # the rest is still measured


def test_text_report_against_a_peer_shows_the_verdict() -> None:
    with DHT(host_maddrs=[LOOPBACK], start=True) as peer:
        result = run("doctor", str(peer.get_visible_maddrs()[0]), "--host", "127.0.0.1")
    assert result.returncode == 0, result.stderr
    assert "    reachability: public: Reachable from other peers" in result.stdout
    assert f"    clock offset vs {peer.peer_id}: " in result.stdout and "round trip" in result.stdout


def test_a_peer_sending_a_bogus_time_gets_no_clock_offset() -> None:
    async def lie_about_time(_dht: DHT, node: Any) -> None:
        honest = node.protocol._rpc_ping
        node.host.handlers.inline["dht.ping"] = lambda conn, payload, body: (
            honest(conn, payload, body) | {"time": "tomorrow"}
        )

    with DHT(host_maddrs=[LOOPBACK], start=True) as peer:
        peer.run_coroutine(lie_about_time)
        reach = doctor_json(str(peer.get_visible_maddrs()[0]), "--host", "127.0.0.1")["reachability"]
    assert reach["status"] == "public" and reach["clock_offset_s"] is None and reach["rtt_ms"] > 0


def test_an_address_nobody_listens_on_exits_3_with_one_line() -> None:
    with closed_port() as port:
        address = f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity.generate().peer_id}"
        result = run("doctor", address, "--host", "127.0.0.1", "--timeout", "3")
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and address in result.stderr and "refused" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["/ip4/127.0.0.1/tcp/1"], "no /p2p/PEER_ID"),
        (["/ip4/300.1.1.1/tcp/1/p2p/x"], "is not an IPv4 address"),
        (["--host", "localhost"], "--host 'localhost' is not an IP address"),
    ],
)
def test_bad_input_exits_2(args: list[str], fragment: str) -> None:
    result = run("doctor", *args)
    assert result.returncode == 2
    assert fragment in result.stderr and "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_a_missing_torch_is_reported_not_fatal() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # import torch now raises ImportError\n"
        "from hivecli.cli.main import main\n"
        "sys.argv = ['hive', 'doctor', '--json', '--host', '127.0.0.1']\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["torch"]["installed"] is False and "torch" in report["torch"]["error"]
    assert report["torch"]["version"] is None and report["cuda"]["available"] is False


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from hivecli.cli.main import main\n"
        "for argv in (['hive', '--help'], ['hive', 'doctor', '--help']):\n"
        "    sys.argv = argv\n"
        "    try:\n        main()\n    except SystemExit:\n        pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.rstrip().endswith("NO-TORCH") and "doctor" in result.stdout


def test_port_info_sees_a_port_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        info = port_info("127.0.0.1", port)
    assert info["port"] == port and info["free"] is False and info["error"]
    assert isinstance(info["ephemeral"], int) and info["ephemeral"] != port


def _fake_proc(root: Path, values: dict[str, str]) -> Path:
    for name, text in values.items():
        path = root / name.replace(".", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


def test_kernel_settings_are_read_and_advice_names_the_sysctl(tmp_path: Path) -> None:
    root = _fake_proc(
        tmp_path,
        {
            "net.ipv4.tcp_slow_start_after_idle": "1",
            "net.ipv4.tcp_congestion_control": "cubic",
            "net.ipv4.tcp_rmem": "4096\t131072\t6291456",
            "net.ipv4.tcp_wmem": "4096 16384 33554432",
            "net.core.rmem_max": "212992",
        },
    )
    info = kernel_info(root)
    settings = info["settings"]
    assert settings["net.ipv4.tcp_slow_start_after_idle"] == 1
    assert settings["net.ipv4.tcp_congestion_control"] == "cubic"
    assert settings["net.ipv4.tcp_rmem"] == [4096, 131072, 6291456]
    assert settings["net.core.rmem_max"] == 212992 and settings["net.core.wmem_max"] is None  # missing: None
    advice = "\n".join(info["advice"])
    assert "sysctl -w net.ipv4.tcp_slow_start_after_idle=0" in advice
    assert "sysctl -w net.ipv4.tcp_rmem='4096 131072 33554432'" in advice and "tcp_wmem" not in advice

    assert "tcp_congestion_control" not in advice  # cubic: nothing to say

    tuned = _fake_proc(tmp_path / "tuned", {"net.ipv4.tcp_slow_start_after_idle": "0"})
    assert kernel_info(tuned)["advice"] == []
    bbr = _fake_proc(tmp_path / "bbr", {"net.ipv4.tcp_congestion_control": "bbr"})
    [line] = kernel_info(bbr)["advice"]
    assert "PROBE_RTT" in line and line.endswith("sudo sysctl -w net.ipv4.tcp_congestion_control=cubic")
    assert all(v is None for v in kernel_info(tmp_path / "nothing")["settings"].values())  # not Linux


@pytest.mark.parametrize("bogus", [True, "1.7e9", float("nan"), float("inf"), None, [1.0], 10**400])
def test_peer_time_rejects_hostile_values(bogus: Any) -> None:
    assert peer_time({"time": bogus}) is None


def test_peer_time_and_clock_offset() -> None:
    assert peer_time({"time": 1_700_000_000}) == 1_700_000_000.0
    assert peer_time({"node": None}) is None and peer_time("not a map") is None
    # sent at 100.0, 0.2 s round trip: their clock read 100.1 at the midpoint means offset 0
    assert clock_offset(100.0, 0.2, 100.1) == pytest.approx(0.0)
    assert clock_offset(100.0, 0.2, 102.1) == pytest.approx(2.0)
