"""Whole runs of the real `hive start` / `hive join` on loopback, with the offline default recipe:
a late joiner that trains until the run's goal, a SIGKILL during checkpoint writes, identities
and run directories, run.min_peers. Every wait is on a JSON event (or a file), with a deadline."""

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from hivecli.testing import HiveProcess

REPO = Path(__file__).resolve().parent.parent
DEFAULT = str(REPO / "recipes" / "default.toml")
LOOPBACK = ["--host", "127.0.0.1"]
BATCH = 16
# the recipe is being retuned: pin what these tests depend on
PINNED = [
    "--set", f"data.batch_size={BATCH}",
    "--set", "averaging.every_steps=1",
    "--set", "averaging.every_seconds=0.0",
    "--set", "output.report_every_seconds=0.5",
    "--max-steps", "1000000",
]  # fmt: skip


def peer(command, *args, out, cwd):
    """`hive start/join ... --json` on loopback, writing its runs under `out`."""
    return HiveProcess(command, *args, *PINNED, "--set", f'output.dir="{out}"', "--json", *LOOPBACK, cwd=cwd)


def progress(proc, since=0):
    return [e for e in proc.events[since:] if e["event"] == "progress"]


def close_all(*procs):
    for proc in procs:
        if proc is not None:
            proc.close()  # kills it if it still runs, reaps it, joins its readers


@pytest.mark.slow
def test_start_then_join_seconds_later_average_for_the_whole_run(tmp_path):
    goal = 4800
    goal_set = ["--set", f"run.total_samples={goal}"]
    starter = peer("start", DEFAULT, *goal_set, out=tmp_path / "a", cwd=tmp_path)
    joiner = None
    try:
        address = starter.wait_event("listening", timeout=60)["maddrs"][0]
        starter.wait_event("started", timeout=60)
        starter.wait_event("progress", lambda e: e["step"] >= 30, timeout=60)  # a human pastes the join line
        joiner = peer("join", address, out=tmp_path / "b", cwd=tmp_path)
        loaded_at = joiner.wait_event("state_loaded", timeout=60)["step"]
        assert loaded_at >= 30  # the run's state, not a fresh model
        first = joiner.wait_event("progress", timeout=30)
        assert first["goal_samples"] == goal and first["run_samples"] < goal / 2, first
        for proc in (starter, joiner):
            proc.wait_event("progress", lambda e: e["rounds"] >= 1 and e["last_group_size"] == 2 and e["peers"] == 2)
        finished = [proc.wait_event("finished", timeout=90) for proc in (starter, joiner)]
        assert [starter.wait(30), joiner.wait(30)] == [0, 0], joiner.stderr[-3000:]
    finally:
        close_all(joiner, starter)

    for done in finished:
        assert done["reason"] == "run_complete", done
        assert done["run_samples"] >= goal, done
        assert done["rounds"] >= 3, done
    # the joiner kept training until the goal: a fair part of what was left when it came, not a few steps
    remaining = goal - first["run_samples"]
    own = (finished[1]["step"] - loaded_at) * BATCH
    assert own >= 0.25 * remaining, (own, remaining, finished[1])

    # averaging in pairs went on for the whole run, on both peers: rounds grew in the first third
    # of what was left when the joiner came, and in the last third, and every round was a pair
    start, span = first["run_samples"], goal - first["run_samples"]
    for proc in (starter, joiner):
        reports = [e for e in progress(proc) if e["run_samples"] >= start]
        assert all(e["last_group_size"] in (0, 2) for e in reports)  # 0: no round yet
        thirds = [
            [e["rounds"] for e in reports if start + i * span / 3 <= e["run_samples"] < start + (i + 1) * span / 3]
            for i in range(3)
        ]
        before_last = [e["rounds"] for e in reports if e["run_samples"] < start + 2 * span / 3]
        assert thirds[0] and max(thirds[0]) >= 1, thirds
        assert thirds[2] and max(thirds[2]) > max(before_last, default=0), thirds


@pytest.mark.slow
def test_kill_9_mid_checkpoint_then_resume_from_a_valid_checkpoint(tmp_path):
    identity = ["--identity", str(tmp_path / "id.pem")]
    often = ["--set", "output.checkpoint_every_steps=1", "--set", "output.eval_every_steps=5"]
    first = peer("start", DEFAULT, *identity, *often, out=tmp_path / "runs", cwd=tmp_path)
    restarted = None
    try:
        run_dir = Path(first.wait_event("started", timeout=60)["run_dir"])
        folder = run_dir / "checkpoints"
        first.wait_event("checkpoint", lambda e: e["step"] >= 10, timeout=60)
        # kill it while a checkpoint is being written: poll for a temporary file, the sign of a
        # write in progress; if none is caught in time, kill right after a checkpoint event
        deadline, caught = time.monotonic() + 5, False
        while time.monotonic() < deadline and not caught:
            caught = any(name.endswith(".tmp") for name in os.listdir(folder))
        os.kill(first.proc.pid, signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
        seen = max(e["step"] for e in first.events if e["event"] == "checkpoint")
        assert_checkpoints_load(folder)  # a kill at any moment leaves whole files under the final names

        # the restart writes no checkpoint of its own until it is stopped: the folder is then as
        # the restart left it after cleaning up
        rarely = ["--set", "output.checkpoint_every_steps=100000", "--set", "output.eval_every_steps=100000"]
        restarted = peer("start", DEFAULT, *identity, *rarely, out=tmp_path / "runs", cwd=tmp_path)
        started = restarted.wait_event("started", timeout=60)
        assert started["run_dir"] == str(run_dir)
        assert started["resumed_from"] is not None, started
        assert started["step"] >= seen, (started, seen)  # the event comes after the file is in place
        assert Path(started["resumed_from"]) == folder / f"step-{started['step']}.pt"
        assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")], caught
        assert_checkpoints_load(folder)
        restarted.wait_event("progress", lambda e: e["step"] > started["step"], timeout=60)
        assert restarted.stop(signal.SIGTERM) == 0, restarted.stderr[-3000:]
    finally:
        close_all(restarted, first)
    done = restarted.wait_event("finished", timeout=5)
    assert done["reason"] == "stopped" and done["step"] > started["step"]
    assert torch.load(done["checkpoint"], weights_only=True)["step"] == done["step"]
    assert_checkpoints_load(folder)


def assert_checkpoints_load(folder):
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".pt" and not p.name.startswith("."))
    assert "latest.pt" in names and "best.pt" in names and any(n.startswith("step-") for n in names), names
    for name in names:
        state = torch.load(folder / name, map_location="cpu", weights_only=True)
        assert isinstance(state["step"], int) and state["model"], name
        if name.startswith("step-"):
            assert name == f"step-{state['step']}.pt"


def snapshot(directory):
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_a_reused_identity_never_touches_the_first_runs_files(tmp_path):
    out = tmp_path / "runs"
    small = ["--set", f"run.total_samples={20 * BATCH}", "--set", "output.eval_every_steps=10"]
    mine = ["--identity", str(tmp_path / "id.pem")]
    first = peer("start", DEFAULT, *mine, *small, out=out, cwd=tmp_path)
    second = third = None
    try:
        run1 = Path(first.wait_event("started", timeout=60)["run_dir"])
        assert first.wait_event("finished", timeout=60)["reason"] == "run_complete"
        assert first.wait(30) == 0, first.stderr[-3000:]
        before = snapshot(run1)
        assert {"peer.json", "recipe.toml", "metrics.jsonl", "checkpoints/latest.pt"} <= set(before), sorted(before)

        second = peer("start", DEFAULT, *mine, *small, "--fresh", out=out, cwd=tmp_path)
        # another identity, meanwhile: nothing to resume, its own directory
        third = peer("start", DEFAULT, "--identity", str(tmp_path / "other.pem"), *small, out=out, cwd=tmp_path)
        run2 = Path(second.wait_event("started", timeout=60)["run_dir"])
        run3 = Path(third.wait_event("started", timeout=60)["run_dir"])
        for proc in (second, third):
            assert proc.wait_event("finished", timeout=60)["reason"] == "run_complete"
            assert proc.wait(30) == 0, proc.stderr[-3000:]
    finally:
        close_all(third, second, first)

    assert second.wait_event("started")["resumed_from"] is None
    assert run2 != run1 and run2.name == run1.name  # a new run of the same peer
    assert run3.name != run1.name and run3 != run2  # another peer: another PEER directory
    for run in (run2, run3):
        assert run.parent.parent == run1.parent.parent  # OUTPUT/PREFIX/RUN_ID/PEER
        assert (run / "checkpoints" / "latest.pt").exists()
    after = snapshot(run1)
    assert sorted(after) == sorted(before)
    changed = [name for name in before if after[name] != before[name]]
    assert not changed, changed


@pytest.mark.slow
def test_min_peers_makes_the_starter_wait_then_train_together(tmp_path):
    starter = peer("start", DEFAULT, "--set", "run.min_peers=2", out=tmp_path / "a", cwd=tmp_path)
    joiner = None
    try:
        address = starter.wait_event("listening", timeout=60)["maddrs"][0]
        starter.wait_event("started", timeout=60)
        starter.wait_event("waiting", lambda e: e.get("elapsed_s", 0) >= 1.0, timeout=30)  # it keeps waiting
        waits = [e for e in starter.events if e["event"] == "waiting"]
        assert len(waits) >= 2 and all(e["remaining_s"] > 0 and not e.get("done") for e in waits), waits
        assert not [e for e in progress(starter) if e["step"] > 0]  # alone, it does not train
        joined_at = len(starter.events)

        joiner = peer("join", address, out=tmp_path / "b", cwd=tmp_path)
        done = starter.wait_event("waiting", lambda e: e.get("done"), timeout=60)
        waited = starter.events[: starter.events.index(done)]
        assert len(waited) >= joined_at  # it stopped waiting only once the joiner was there
        assert not [e for e in waited if e["event"] == "progress" and e["step"] > 0]
        for proc in (starter, joiner):
            proc.wait_event("progress", lambda e: e["rounds"] >= 1 and e["last_group_size"] == 2, timeout=60)
        codes = [starter.stop(signal.SIGTERM), joiner.stop(signal.SIGTERM)]
    finally:
        close_all(joiner, starter)
    assert codes == [0, 0]
    assert starter.wait_event("finished")["reason"] == "stopped"
