"""`hive pull-state ADDRESS -o FILE|DIR` as a real subprocess: where it writes, the one-line
errors it gives before touching the network, and its wait for a run to be announced."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hivecli.net import Identity
from hivecli.registry import quickstart_cnn
from hivecli.testing import HiveProcess

REPO = Path(__file__).resolve().parent.parent
DEFAULT = str(REPO / "recipes" / "default.toml")
LOOPBACK = ["--host", "127.0.0.1"]


def hive(*args, cwd, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "hivecli.cli.main", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def listener():
    """A TCP socket on 127.0.0.1 that accepts nothing by itself: a connection to it stays queued,
    so a test can tell whether a command tried to reach the peer at its address."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        yield sock, f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity.generate().peer_id}"


def assert_never_connected(sock):
    with pytest.raises(BlockingIOError):
        sock.accept()[0].close()


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (
            "missing/dir/x.pt",
            "-o missing/dir/x.pt: directory missing/dir does not exist; create it first or choose another path",
        ),
        ("missing/", "-o missing/: directory missing does not exist; create it first or choose another path"),
        ("a-file/x.pt", "-o a-file/x.pt: a-file is not a directory; choose another path"),
        ("a-file/", "-o a-file/: a-file is not a directory; choose another path"),
    ],
)
def test_a_bad_output_path_is_one_line_before_any_connection_and_creates_nothing(tmp_path, listener, output, message):
    sock, address = listener
    (tmp_path / "a-file").write_text("not a directory")
    before = tree(tmp_path)
    result = hive("pull-state", address, "-o", output, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"hive: error: {message}\n"
    assert tree(tmp_path) == before
    assert_never_connected(sock)


def test_pull_state_waits_for_a_run_up_to_its_timeout_and_says_so(tmp_path):
    with HiveProcess("dht", "--json", *LOOPBACK, cwd=tmp_path) as node:
        address = node.wait_event("listening", timeout=60)["maddrs"][0]
        result = hive("pull-state", address, "-o", "x.pt", "--timeout", "2", cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "waiting for a run to be announced in the DHT ..."
    assert lines[1].startswith("hive: error: no run is announced in this DHT yet") and len(lines) == 2
    assert tree(tmp_path) == []


@pytest.mark.slow
@pytest.mark.timeout(300)  # three processes, one of them training, on what may be a busy machine
def test_pull_state_waits_for_the_run_then_writes_prefix_step_n_into_a_directory(tmp_path):
    (tmp_path / "pulled").mkdir()
    node = HiveProcess("dht", "--json", *LOOPBACK, cwd=tmp_path)
    pull = peer = None
    try:
        address = node.wait_event("listening", timeout=60)["maddrs"][0]
        pull = HiveProcess("pull-state", address, "-o", "pulled", "--timeout", "240", cwd=tmp_path)
        pull.wait_stderr("waiting for a run to be announced in the DHT ...", timeout=60)

        peer = HiveProcess(
            "start", DEFAULT, "--json", *LOOPBACK, "--initial-peers", address,
            "--set", f'output.dir="{tmp_path / "runs"}"', "--set", "run.min_peers=1", "--max-steps", "100000",
            cwd=tmp_path,
        )  # fmt: skip
        peer.wait_event("started", timeout=120)
        assert pull.wait(timeout=240) == 0, pull.stderr

        (written,) = (tmp_path / "pulled").iterdir()  # the checkpoint and nothing else: no temporary file
        assert written.name.startswith("digits-demo-step-") and written.suffix == ".pt"
        checkpoint = torch.load(written)
        assert written.name == f"digits-demo-step-{checkpoint['step']}.pt"
        assert checkpoint["recipe"]["run"]["prefix"] == "digits-demo"
        quickstart_cnn((3, 32, 32), 10).load_state_dict(checkpoint["model"])  # plain torch reads it
        assert f"to pulled/{written.name}" in pull.stderr

        # with a live peer at the address, a bad -o still fails at once and creates nothing
        peer_address = peer.wait_event("listening")["maddrs"][0]
        before = tree(tmp_path / "pulled")
        missing = hive("pull-state", peer_address, "-o", "missing/dir/x.pt", cwd=tmp_path)
        assert missing.returncode == 2, missing.stderr
        assert missing.stderr == (
            "hive: error: -o missing/dir/x.pt: directory missing/dir does not exist; "
            "create it first or choose another path\n"
        )
        assert not (tmp_path / "missing").exists() and tree(tmp_path / "pulled") == before
    finally:
        codes = [p.stop() for p in (peer, pull, node) if p is not None]
    assert codes[0] == 0 and codes[-1] == 0  # the peer and the DHT node exit 0 on SIGTERM
