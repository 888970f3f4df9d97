"""Private swarms: `hive keygen` makes a key, and only peers that hold it can join the DHT."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hivecli import DHT
from hivecli._exceptions import BootstrapError
from hivecli.net.connection import NetSettings
from hivecli.net.secure import SecuritySettings, load_swarm_key, swarm_key_fingerprint
from hivecli.utils.timing import get_dht_time

HIVE = [sys.executable, "-m", "hivecli.cli.main"]


def _hive(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HIVE, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def _settings(key: bytes | None) -> NetSettings:
    return NetSettings(security=SecuritySettings(swarm_key=key))


def test_keygen_writes_a_key_once_and_prints_its_fingerprint(tmp_path: Path) -> None:
    done = _hive("keygen", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    key = load_swarm_key(tmp_path / "swarm.key")
    assert swarm_key_fingerprint(key) in done.stdout
    assert (tmp_path / "swarm.key").stat().st_mode & 0o777 == 0o600

    again = _hive("keygen", cwd=tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "swarm.key" in again.stderr and load_swarm_key(tmp_path / "swarm.key") == key  # never overwritten

    ident = _hive("keygen", "--identity", "me.key", cwd=tmp_path)
    assert ident.returncode == 0 and "12D3KooW" in ident.stdout


def test_a_missing_swarm_key_file_is_one_line_naming_it(tmp_path: Path) -> None:
    done = _hive("dht", "--host", "127.0.0.1", "--swarm-key", "nope.key", cwd=tmp_path)
    assert done.returncode == 2
    assert "nope.key" in done.stderr and "hive keygen" in done.stderr and "Traceback" not in done.stderr


def test_only_peers_holding_the_swarm_key_join(tmp_path: Path) -> None:
    assert _hive("keygen", "--swarm-key", "a.key", cwd=tmp_path).returncode == 0
    assert _hive("keygen", "--swarm-key", "b.key", cwd=tmp_path).returncode == 0
    key_a, key_b = load_swarm_key(tmp_path / "a.key"), load_swarm_key(tmp_path / "b.key")
    first = DHT(start=True, net_settings=_settings(key_a), wait_timeout=1.0)
    try:
        address = [str(m) for m in first.get_visible_maddrs()]
        first.store("secret", "only for the swarm", get_dht_time() + 60)
        for key in (None, key_b):  # no key, another swarm's key
            with pytest.raises(BootstrapError):
                DHT(initial_peers=address, start=True, net_settings=_settings(key), wait_timeout=1.0)
        member = DHT(initial_peers=address, start=True, net_settings=_settings(key_a), wait_timeout=1.0)
        try:
            found = member.get("secret", latest=True)
            assert found is not None and found.value == "only for the swarm"
        finally:
            member.shutdown()
    finally:
        first.shutdown()
