"""`hive start/join --nproc-per-node N`: one peer of a run made of N processes (hivecli.distributed),
on loopback with gloo on the CPU. Waits are on events, files and processes, with deadlines."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from hivecli._exceptions import ConfigError
from hivecli.cli.train_cmd import _without_nproc
from hivecli.distributed import ShardSampler, peer_device
from hivecli.recipe import load_recipe
from hivecli.testing import HiveProcess, wait_for

REPO = Path(__file__).resolve().parent.parent
DEFAULT = str(REPO / "recipes" / "default.toml")
HIVE = [sys.executable, "-m", "hivecli.cli.main"]
PEER_ID = "12D3KooWJGSd9oyjVR6895A3udrYuqrrm6ScjCi7k6D5qF6C3g3u"
STOP_DEADLINE_S = 20.0  # from the signal to the launcher's exit, every rank gone
KILL_AFTER_S = 45.0  # torchrun's launcher kills ranks still running 30 s after the signal; the test kills it later


def _args(tmp_path: Path, *more: str) -> list[str]:
    return ["--json", "--host", "127.0.0.1", "--port", "0", "--set", f'output.dir="{tmp_path / "runs"}"', *more]


def _ranks(launcher: HiveProcess) -> list[psutil.Process]:
    """The launcher's rank processes (`python -u -m hivecli.cli.main ...`, started by torchrun's launcher)."""
    found = []
    for child in psutil.Process(launcher.proc.pid).children(recursive=True):
        try:
            if "hivecli.cli.main" in child.cmdline():
                found.append(child)
        except psutil.Error:
            continue
    return found


def _stop_within_deadline(launcher: HiveProcess, sig: int, ranks: list[psutil.Process]) -> int:
    began = time.monotonic()
    code = launcher.stop(sig, timeout=KILL_AFTER_S)
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks), timeout=5,
             what="every rank to be gone")  # fmt: skip
    took = time.monotonic() - began
    # rare in CI (30.9 s once: torchrun's launcher killed the ranks after its 30 s): say what they printed
    assert took < STOP_DEADLINE_S, f"stopped in {took:.1f} s; the peer's stderr ended with:\n{launcher.stderr[-4000:]}"
    return code


def _rank_rows(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "ranks" / f"rank-{rank}.jsonl").read_text().splitlines()]


def _assert_identical_ranks(run_dir: Path) -> list[dict]:
    """Both ranks wrote a digest at every broadcast (the same syncs, rounds and steps) and the digests match."""
    first, second = _rank_rows(run_dir, 0), _rank_rows(run_dir, 1)
    assert [r["sync"] for r in first] == list(range(len(first)))
    same = ("sync", "kind", "round", "step", "digest")
    assert [[r[k] for k in same] for r in first] == [[r[k] for k in same] for r in second]
    assert first[0]["kind"] == "start"
    return first


# ---- a multi-process peer in a run ------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_two_process_peer_averages_as_one_peer_with_identical_ranks_and_stops_on_ctrl_c(tmp_path):
    args = _args(tmp_path, "--max-seconds", "150")  # a safety net: the test stops both
    with HiveProcess("start", DEFAULT, *args, cwd=tmp_path) as single:
        address = single.wait_event("listening", timeout=60)["maddrs"][0]
        with HiveProcess("join", address, "--nproc-per-node", "2", *args, cwd=tmp_path) as multi:
            run_dir = Path(multi.wait_event("started", timeout=90)["run_dir"])
            ranks = wait_for(lambda: (found := _ranks(multi)) and len(found) == 2 and found, timeout=10,
                             what="the peer's 2 rank processes")  # fmt: skip
            for peer in (single, multi):  # both average, with each other
                peer.wait_event("progress", lambda e: e["rounds"] >= 3 and e["last_group_size"] == 2, timeout=90)

            def listed() -> dict:
                out = subprocess.run([*HIVE, "peers", address, "--run", "digits-demo", "--json"], capture_output=True,
                                     text=True, timeout=60, cwd=tmp_path)  # fmt: skip
                assert out.returncode == 0, out.stderr
                return json.loads(out.stdout)["runs"]["digits-demo"]["peers"]

            peers = wait_for(lambda: (found := listed()) and len(found) >= 2 and found, timeout=30, what="2 peers")
            assert len(peers) == 2  # 3 processes, 2 peers: rank 1 runs no DHT and publishes nothing
            assert multi.wait_event("listening")["peer_id"] in peers

            assert _stop_within_deadline(multi, signal.SIGINT, ranks) == 130  # Ctrl+C, as a one-process peer
        finished = multi.wait_event("finished", timeout=5)
        assert finished["reason"] == "stopped" and Path(finished["checkpoint"]).exists()
        assert "closing signal" not in multi.stderr  # torchrun's own log lines stay quiet
        assert single.stop(signal.SIGTERM) == 0

    rows = _assert_identical_ranks(run_dir)
    assert sum(r["kind"] == "round" for r in rows) >= 3  # several averaging rounds, each handed to rank 1
    assert len({r["digest"] for r in rows}) == len(rows)  # every round changed the parameters
    progress = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("rounds", 0) for r in progress if r["event"] == "progress") >= 3


@pytest.mark.timeout(120)
def test_a_peer_alone_stops_on_sigterm_and_finishes_with_exit_code_0(tmp_path):
    alone = ["--nproc-per-node", "2", "--set", "run.min_peers=1"]
    with HiveProcess("start", DEFAULT, *alone, *_args(tmp_path, "--max-seconds", "100"), cwd=tmp_path) as peer:
        peer.wait_event("progress", timeout=90)
        ranks = _ranks(peer)
        assert len(ranks) == 2
        assert _stop_within_deadline(peer, signal.SIGTERM, ranks) == 0
    assert peer.wait_event("finished", timeout=5)["reason"] == "stopped"

    with HiveProcess("start", DEFAULT, *alone, *_args(tmp_path, "--max-steps", "30", "--fresh"), cwd=tmp_path) as peer:
        assert peer.wait(timeout=90) == 0
        finished = peer.wait_event("finished", timeout=5)
    assert finished["reason"] == "max_steps" and finished["step"] == 30
    _assert_identical_ranks(Path(finished["checkpoint"]).parent.parent)


# ---- exit codes and errors ----------------------------------------------------------------------------


def _hive(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*HIVE, *args], capture_output=True, text=True, timeout=90, cwd=cwd)


def test_an_error_on_rank_0_is_the_launchers_exit_code(tmp_path):
    # 1,438 training samples: a shard of 719 per process, fewer than a batch of 1,000. Only rank 0 finds out.
    settings = ["--set", "run.min_peers=1", "--set", "data.batch_size=1000"]
    result = _hive("start", DEFAULT, "--nproc-per-node", "2", *settings, *_args(tmp_path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("hive: error:")]
    assert len(errors) == 1 and "shared by 2 processes" in errors[0]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr


@pytest.mark.parametrize("command", ["start", "join"])
def test_nproc_per_node_0_is_a_one_line_usage_error(tmp_path, command):
    first = DEFAULT if command == "start" else f"/ip4/127.0.0.1/tcp/1/p2p/{PEER_ID}"
    result = _hive(command, first, "--nproc-per-node", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "hive: error: --nproc-per-node 0: a peer runs at least 1 process; give 1 (the default) or more"
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(
        ConfigError, match=r'run.device = "cuda", but this machine has no CUDA device .*run.device = "cpu"'
    ):
        peer_device(load_recipe(DEFAULT, ['run.device="cuda"']))
    assert peer_device(load_recipe(DEFAULT, ['run.device="auto"'])).type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_fails_in_the_launcher_before_any_process_starts(tmp_path):
    result = _hive("start", DEFAULT, "--nproc-per-node", "2", "--set", 'run.device="cuda"', cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and 'run.device = "cuda"' in result.stderr


def test_only_the_parameters_mode_runs_as_several_processes():
    with pytest.raises(ConfigError, match=r'averaging.mode = "parameters" only.*"diloco"'):
        peer_device(load_recipe(DEFAULT, ['averaging.mode="diloco"', 'run.device="cpu"']), processes=2)


def test_the_processes_run_the_same_command_without_the_flag():
    argv = ["-v", "join", "ADDR", "--nproc-per-node", "4", "--json", "--nproc-per-node=2", "--max-steps", "5"]
    assert _without_nproc(argv) == ["-v", "join", "ADDR", "--json", "--max-steps", "5"]


def test_shards_split_one_shuffle_into_equal_disjoint_parts():
    shards = [list(ShardSampler(103, rank, 3, torch.Generator().manual_seed(7))) for rank in range(3)]
    assert [len(s) for s in shards] == [34, 34, 34]
    assert len(set().union(*shards)) == 102
    order = torch.randperm(103, generator=torch.Generator().manual_seed(7)).tolist()  # the peer's one shuffle
    assert shards[1] == order[1:102:3]
