"""The real `hive start/join/peers/pull-state/local/recipe` commands in subprocesses, on loopback,
with the offline default recipe. Waits are on events with deadlines, never on sleeps."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from hivecli.net import Identity
from hivecli.registry import quickstart_cnn

REPO = Path(__file__).resolve().parent.parent
DEFAULT = str(REPO / "recipes" / "default.toml")
HIVE = [sys.executable, "-m", "hivecli.cli.main"]
LOOPBACK = ["--host", "127.0.0.1"]


def hive(*args, cwd=None, env=None, timeout=120):
    return subprocess.run([*HIVE, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


class Peer:
    """A `hive start/join --json` process; its JSON events are read as they come."""

    def __init__(self, *args, cwd, env=None):
        self.proc = subprocess.Popen(
            [*HIVE, *args, "--json", *LOOPBACK], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=cwd, env=env,
        )  # fmt: skip
        self.events = queue.Queue()
        self.stderr_lines = []
        self.readers = [
            threading.Thread(target=self._pump, daemon=True),
            threading.Thread(target=lambda: self.stderr_lines.extend(self.proc.stderr), daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _pump(self):
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def wait_event(self, name, condition=lambda e: True, timeout=90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, f"peer exited {self.proc.returncode}: {''.join(self.stderr_lines)}"
                continue
            if event["event"] == name and condition(event):
                return event
        raise TimeoutError(f"no {name!r} event within {timeout} s; stderr: {''.join(self.stderr_lines)[-2000:]}")

    def stop(self, sig):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.proc.kill()
            self.proc.wait()
            for reader in self.readers:  # they end at EOF, once the process is gone
                reader.join(timeout=10)
            self.proc.stdout.close()
            self.proc.stderr.close()


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


@pytest.mark.slow
def test_start_join_peers_pull_state_and_stop(workdir):
    out_dir = ["--set", f'output.dir="{workdir / "runs"}"', "--max-steps", "100000"]
    first = Peer("start", DEFAULT, *out_dir, cwd=workdir)
    second = None
    try:
        listening = first.wait_event("listening", timeout=60)
        address = listening["maddrs"][0]
        assert listening["join"] == f"hive join {address}"
        second = Peer("join", address, *out_dir, cwd=workdir)  # no recipe: fetched from the DHT
        assert second.wait_event("state_loaded")["step"] >= 0
        for peer in (first, second):  # both average with each other
            peer.wait_event("progress", lambda e: e["rounds"] >= 1 and e["last_group_size"] == 2)

        deadline = time.monotonic() + 60
        while True:
            listed = hive("peers", address, "--run", "digits-demo", "--json", cwd=workdir)
            assert listed.returncode == 0, listed.stderr
            run = json.loads(listed.stdout)["runs"]["digits-demo"]
            if len(run["peers"]) == 2 or time.monotonic() > deadline:
                break
        assert len(run["peers"]) == 2 and all(p["step"] > 0 for p in run["peers"].values())
        assert run["summary"]["model"] == "quickstart-cnn" and run["summary"]["input_shape"] == [3, 32, 32]

        pulled = hive("pull-state", address, "-o", str(workdir / "pulled.pt"), cwd=workdir)
        assert pulled.returncode == 0, pulled.stderr
        checkpoint = torch.load(workdir / "pulled.pt")
        model = quickstart_cnn((3, 32, 32), 10)
        model.load_state_dict(checkpoint["model"])  # plain torch reads it
        assert checkpoint["step"] > 0 and checkpoint["recipe"]["run"]["prefix"] == "digits-demo"
        assert (
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).load_state_dict(checkpoint["optimizer"]) is None
        )
    finally:
        codes = [first.stop(signal.SIGINT)] + ([second.stop(signal.SIGTERM)] if second else [])
    assert codes == [130, 0]  # Ctrl+C exits 130, SIGTERM 0; both after a checkpoint
    finished = first.wait_event("finished", timeout=5)
    assert finished["reason"] == "stopped" and Path(finished["checkpoint"]).exists()
    run_dir = Path(finished["checkpoint"]).parent.parent
    assert (run_dir / "recipe.toml").exists() and (run_dir / "checkpoints" / "latest.pt").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in row and "samples_per_s" in row and "peers" in row for row in rows)
    assert any("accuracy" in row for row in rows)


@pytest.mark.slow
def test_local_runs_n_peers_and_prints_their_accuracy(workdir):
    result = hive(
        "local", "2", DEFAULT, "--max-steps", "60", "--set", f'output.dir="{workdir / "runs"}"', cwd=workdir,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Results per peer" in result.stdout
    assert "[peer 0]" in result.stderr and "[peer 1]" in result.stderr
    rows = [line for line in result.stdout.splitlines() if line.strip().startswith(("│ 0", "│ 1"))]
    assert len(rows) == 2 and all(" 60 " in row for row in rows)


def test_a_fetched_recipe_with_user_code_is_refused_without_trust(workdir):
    (workdir / "mymodels.py").write_text(
        "from hivecli.registry import mlp\n\ndef build(shape, classes):\n    return mlp(shape, classes, 16)\n"
    )
    recipe = workdir / "custom.toml"
    recipe.write_text('[run]\nprefix = "custom"\n[model]\nname = "mymodels:build"\n[limits]\nmax_steps = 100000\n')
    env = dict(os.environ, PYTHONPATH=str(workdir))
    first = Peer("start", str(recipe), "--set", f'output.dir="{workdir / "runs"}"', cwd=workdir, env=env)
    try:
        address = first.wait_event("listening", timeout=60)["maddrs"][0]
        first.wait_event("started")
        refused = hive("join", address, *LOOPBACK, cwd=workdir)
        assert refused.returncode == 2, refused.stderr
        assert "mymodels:build" in refused.stderr and "--trust-recipe" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        assert first.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize(
    ("recipe_text", "message"),
    [
        ("[averaging]\ntarget_group_size = 0\n", "averaging.target_group_size = 0: must be >= 2"),
        ("[averaging]\ntarget_grup_size = 4\n", "did you mean 'target_group_size'?"),
        ("[limits\n", "not valid TOML"),
    ],
)
def test_bad_recipes_exit_2_with_one_line_naming_the_file_and_key(workdir, recipe_text, message):
    path = workdir / "bad.toml"
    path.write_text(recipe_text)
    for command in (["start", str(path), *LOOPBACK], ["recipe", "check", str(path)]):
        result = hive(*command, cwd=workdir)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"hive: error: {path}") and message in result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_recipe_check_and_schema_print_parseable_output(workdir):
    checked = hive("recipe", "check", DEFAULT, "--json", "--set", "limits.max_steps=7")
    assert checked.returncode == 0 and json.loads(checked.stdout)["limits"]["max_steps"] == 7
    schema = json.loads(hive("recipe", "schema").stdout)
    assert {"run", "model", "data", "averaging"} <= set(schema["properties"])


def test_join_an_unreachable_peer_exits_3(workdir):
    ghost = Identity.generate().peer_id
    result = hive("join", f"/ip4/127.0.0.1/tcp/1/p2p/{ghost}", *LOOPBACK, cwd=workdir)
    assert result.returncode == 3, result.stderr
    assert "refused" in result.stderr and "Traceback" not in result.stderr


def test_a_batch_larger_than_the_dataset_is_a_usage_error_not_a_hang(workdir):
    result = hive("start", DEFAULT, *LOOPBACK, "--set", "data.batch_size=2000", cwd=workdir)
    assert result.returncode == 2, result.stderr
    assert "data.batch_size = 2000 is larger than the" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "settings"),
    [
        ("collaborative", ["averaging.target_batch_size=256"]),
        ("diloco", ["averaging.local_steps=20", 'optimizer.name="adamw"', "optimizer.lr=0.001"]),
    ],
)
def test_start_and_join_train_in_the_collaborative_and_diloco_modes(workdir, mode, settings):
    fast = ["averaging.min_matchmaking_time=2", "averaging.request_timeout=1", "output.report_every_seconds=0.5"]
    sets = [arg for value in [f'averaging.mode="{mode}"', *settings, *fast] for arg in ("--set", value)]
    out_dir = ["--set", f'output.dir="{workdir / "runs"}"', "--max-steps", "100000"]
    first = Peer("start", DEFAULT, *sets, *out_dir, cwd=workdir)
    second = None
    try:
        address = first.wait_event("listening", timeout=60)["maddrs"][0]
        second = Peer("join", address, *out_dir, cwd=workdir)  # the mode comes with the run's recipe
        second.wait_event("state_loaded")
        for peer in (first, second):  # each epoch (outer step) averages with the other peer
            peer.wait_event("progress", lambda e: e["rounds"] >= 2 and e["last_group_size"] == 2)
        deadline = time.monotonic() + 60
        while True:
            listed = hive("peers", address, "--run", "digits-demo", "--json", cwd=workdir)
            assert listed.returncode == 0, listed.stderr
            epoch = json.loads(listed.stdout)["runs"]["digits-demo"]["epoch"]
            if (epoch and epoch["epoch"] >= 2) or time.monotonic() > deadline:
                break
        assert epoch["mode"] == mode and epoch["epoch"] >= 2
        assert epoch["target"] == (256 if mode == "collaborative" else 20) and epoch["progress"] >= 0
        table = hive("peers", address, "--run", "digits-demo", cwd=workdir)
        assert ("outer step" if mode == "diloco" else "epoch") in table.stdout and "toward the next" in table.stdout
        pulled = hive("pull-state", address, "-o", str(workdir / "pulled.pt"), cwd=workdir)  # from this mode's donors
        assert pulled.returncode == 0, pulled.stderr
        checkpoint = torch.load(workdir / "pulled.pt")
        quickstart_cnn((3, 32, 32), 10).load_state_dict(checkpoint["model"])
        assert checkpoint["step"] >= 2
    finally:
        codes = [first.stop(signal.SIGTERM)] + ([second.stop(signal.SIGTERM)] if second else [])
    assert codes == [0, 0]
    finished = first.wait_event("finished", timeout=5)
    assert finished["step"] >= 2 and finished["accuracy"] is not None
