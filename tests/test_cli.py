"""The real `hive` command in subprocesses."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading

import pytest

from hivecli.net import Identity

HIVE = [sys.executable, "-m", "hivecli.cli.main"]


def run(*args, timeout=60, env=None):
    return subprocess.run([*HIVE, *args], capture_output=True, text=True, timeout=timeout, env=env)


class Node:
    """A `hive dht --json` process; reads its JSON events as they come."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [*HIVE, "dht", "--json", "--host", "127.0.0.1", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def next_event(self, timeout=30):
        return self.events.get(timeout=timeout)

    def stop(self, sig):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc.kill()
            self.proc.stdout.close()
            self.proc.stderr.close()


def test_help_lists_commands_and_does_not_import_torch():
    code = (
        "import sys\n"
        "from hivecli.cli.main import main\n"
        "sys.argv = ['hive', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "dht" in out and "peers" in out
    assert out.strip().endswith("NO-TORCH")


def test_dht_nodes_join_list_peers_and_stop_with_the_right_exit_codes():
    first = Node("--refresh-period", "0.5")
    second = None
    try:
        listening = first.next_event()
        assert listening["event"] == "listening" and listening["peer_id"]
        address = listening["maddrs"][0]
        assert address.startswith("/ip4/127.0.0.1/tcp/") and address.endswith(listening["peer_id"])
        second = Node("--initial-peers", address)
        assert second.next_event()["event"] == "listening"
        status = first.next_event()
        while status["routing_table_size"] < 1:
            status = first.next_event()
        listed = run("peers", address, "--json")
        assert listed.returncode == 0, listed.stderr
        peers = json.loads(listed.stdout)
        assert peers["count"] == 2 and all(p["reachable"] for p in peers["peers"])
        assert {p["peer_id"] for p in peers["peers"]} >= {listening["peer_id"]}
        table = run("peers", address)
        assert table.returncode == 0 and listening["peer_id"] in table.stdout.replace("\n", "").replace("│", "")
    finally:
        codes = [node.stop(sig) for node, sig in ((second, signal.SIGTERM), (first, signal.SIGINT)) if node]
    assert codes == [0, 130]


def test_unreachable_peer_exits_3_with_one_line():
    ghost = Identity.generate().peer_id
    result = run("peers", f"/ip4/127.0.0.1/tcp/1/p2p/{ghost}", "--timeout", "2")
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and "refused" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["peers", "/ip4/127.0.0.1/tcp/1"], "no /p2p/PEER_ID"),
        (["peers", "/ip4/300.1.1.1/tcp/1/p2p/x"], "is not an IPv4 address"),
        (["dht", "--initial-peers", " "], "empty value"),
        (["dht", "--host", "localhost"], "--host 'localhost' is not an IP address"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(args, fragment):
    result = run(*args)
    assert result.returncode == 2
    assert fragment in result.stderr and "Traceback" not in result.stderr


def test_initial_peers_from_the_environment_are_validated():
    env = {**os.environ, "HIVE_INITIAL_PEERS": "/ip4/127.0.0.1/tcp/0/p2p/nope"}
    result = run("dht", env=env)
    assert result.returncode == 2 and "/ip4/127.0.0.1/tcp/0/p2p/nope" in result.stderr


def test_sealing_same_host_links_is_a_yes_or_no_from_the_environment(monkeypatch):
    from hivecli._exceptions import ConfigError
    from hivecli.cli._network import net_settings

    for value, sealed in [(None, False), ("0", False), ("1", True), (" Yes ", True), ("off", False)]:
        if value is None:
            monkeypatch.delenv("HIVE_ENCRYPT_SAME_HOST", raising=False)
        else:
            monkeypatch.setenv("HIVE_ENCRYPT_SAME_HOST", value)
        assert net_settings(None).security.encrypt_same_host is sealed, value
        assert net_settings(None).security.encrypt  # links between hosts are sealed either way
    monkeypatch.setenv("HIVE_ENCRYPT_SAME_HOST", "maybe")
    with pytest.raises(ConfigError, match="HIVE_ENCRYPT_SAME_HOST='maybe' is neither yes nor no"):
        net_settings(None)
    result = run("dht", env={**os.environ, "HIVE_ENCRYPT_SAME_HOST": "maybe"})
    assert result.returncode == 2 and "neither yes nor no" in result.stderr and "Traceback" not in result.stderr


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("hive ")


def test_boolean_flags_show_as_plain_flags_in_help():
    env = {**os.environ, "COLUMNS": "200", "TERMINAL_WIDTH": "200"}
    result = run("start", "--help", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    json_line = next(line for line in lines if "--json " in line)
    assert json_line.split("--json", 1)[1].split()[0] == "Print", json_line  # no <bool> between flag and help
    assert "<bool>" not in result.stdout
    port_line = next(line for line in lines if "--port " in line)
    assert port_line.split("--port", 1)[1].split()[0] == "<int", port_line  # options with a value keep their type


def test_peers_prints_hostile_dht_strings_as_text_not_markup(monkeypatch):
    import io

    from rich.console import Console

    from hivecli.cli import _output, peers_cmd

    monkeypatch.setattr(_output, "stdout", Console(file=io.StringIO(), width=200))
    runs = {
        "[/bold]x": {
            "summary": {"model": "[red]m", "dataset": "d", "target_group_size": 4},
            "peers": {"[/]peer": {"step": "[/x]", "maddrs": ["[/b]"], "last_report_s": 1.0}},
        }
    }
    peers_cmd._print_tables([], runs, show_peers=False)  # rich raised MarkupError on "[/bold]"
    printed = _output.stdout.file.getvalue()
    assert "run [/bold]x" in printed and "[red]m" in printed and "[/]peer" in printed
