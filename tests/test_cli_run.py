"""Whole runs of the real `hive start` / `hive join` on loopback, with the offline default recipe:
a late joiner that trains until the run's goal, a SIGKILL during checkpoint writes, identities
and run directories, run.min_peers. Every wait is on a JSON event (or a file), with a deadline."""

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from hivecli.testing import HiveProcess

if sys.version_info >= (3, 11):
    import tomllib
else:  # as hivecli.recipe does
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "recipes" / "default.toml"
LOOPBACK = ["--host", "127.0.0.1"]
BATCH = 16
# the default recipe is being retuned: pin what these tests depend on (its model and data stay)
PINNED = [
    "--set", f"data.batch_size={BATCH}",
    "--set", "averaging.target_group_size=2",  # a group is complete once both peers are in: rounds go on all along
    "--set", "averaging.every_steps=1",
    "--set", "averaging.every_seconds=0.0",
    "--set", "averaging.min_matchmaking_time=1.0",  # a peer that finishes waits at most ~2 s for a last round
    "--set", "averaging.request_timeout=0.5",
    "--set", "output.report_every_seconds=0.5",
    "--max-steps", "1000000",
]  # fmt: skip
# one compute thread per peer: two peers (and a test runner) share 2 cores; more threads thrash
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture
def recipe(tmp_path):
    """The default recipe (its model, data, optimizer) less its own goal and limits, which are being
    retuned, with a goal in samples that no test reaches unless it sets a smaller one."""
    data = tomllib.loads(DEFAULT.read_text())
    data.setdefault("run", {}).pop("total_epochs", None)
    data["run"]["total_samples"] = 10**9
    data["run"]["min_peers"] = 1  # tests that want a starter to wait say so
    data.pop("limits", None)
    path = tmp_path / "recipe.toml"  # two levels of plain values: JSON writes them as TOML does
    path.write_text("".join(f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
                            for name, table in data.items()))  # fmt: skip
    return str(path)


def peer(command, *args, out, cwd):
    """`hive start/join ... --json` on loopback, writing its runs under `out`."""
    return HiveProcess(command, *args, *PINNED, "--set", f'output.dir="{out}"', "--json", *LOOPBACK, cwd=cwd, env=ENV)


def progress(proc):
    return [e for e in proc.events if e["event"] == "progress"]


def close_all(*procs):
    for proc in procs:
        if proc is not None:
            proc.close()  # kills it if it still runs, reaps it, joins its readers


@pytest.mark.slow
def test_start_then_join_seconds_later_average_for_the_whole_run(tmp_path, recipe):
    # measured on 2 busy cores: the starter trains ~13,500 samples alone while the joiner starts (~9 s),
    # then the two train the rest in ~5-15 s; the whole test takes 20-35 s
    goal = 24000
    goal_set = ["--set", f"run.total_samples={goal}"]
    starter = peer("start", recipe, *goal_set, out=tmp_path / "a", cwd=tmp_path)
    joiner = None
    try:
        address = starter.wait_event("listening", timeout=60)["maddrs"][0]
        starter.wait_event("started", timeout=60)
        starter.wait_event("progress", lambda e: e["step"] >= 50, timeout=60)  # a human pastes the join line
        joiner = peer("join", address, out=tmp_path / "b", cwd=tmp_path)
        loaded_at = joiner.wait_event("state_loaded", timeout=60)["step"]
        assert loaded_at >= 50  # the run's state, not a fresh model
        first = joiner.wait_event("progress", timeout=30)
        assert first["goal_samples"] == goal and first["run_samples"] < goal, first
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
    assert own >= 0.25 * remaining and own >= 100 * BATCH, (own, remaining, finished[1])

    # averaging in pairs went on for the whole run, on both peers: rounds grew in the first third
    # of what was left when the joiner came, and in the last third, and every round was a pair.
    # The last third counts the "finished" event too: a fast machine can train all of it between
    # two progress reports (0.5 s apart), as CI once did
    start, span = first["run_samples"], goal - first["run_samples"]
    for proc, done in zip((starter, joiner), finished, strict=True):
        reports = [e for e in progress(proc) if e["run_samples"] >= start]
        assert all(e["last_group_size"] in (0, 2) for e in reports)  # 0: no round yet
        thirds = [
            [e["rounds"] for e in reports if start + i * span / 3 <= e["run_samples"] < start + (i + 1) * span / 3]
            for i in range(3)
        ]
        thirds[2].append(done["rounds"])
        before_last = [e["rounds"] for e in reports if e["run_samples"] < start + 2 * span / 3]
        assert thirds[0] and max(thirds[0]) >= 1, thirds
        assert thirds[2] and max(thirds[2]) > max(before_last, default=0), thirds


@pytest.mark.slow
def test_kill_9_mid_checkpoint_then_resume_from_a_valid_checkpoint(tmp_path, recipe):
    identity = ["--identity", str(tmp_path / "id.pem")]
    often = ["--set", "output.checkpoint_every_steps=1", "--set", "output.eval_every_steps=5"]
    first = peer("start", recipe, *identity, *often, out=tmp_path / "runs", cwd=tmp_path)
    restarted = None
    try:
        run_dir = Path(first.wait_event("started", timeout=60)["run_dir"])
        folder = run_dir / "checkpoints"
        after = random.randint(8, 20)  # which write to hit
        first.wait_event("checkpoint", lambda e: e["step"] >= after, timeout=60)
        # kill it while a checkpoint is being written: poll for the sign of a write in progress, a
        # temporary file or a new name (a new name must be a whole file already); else kill when
        # the poll gives up
        known, deadline, caught = set(os.listdir(folder)), time.monotonic() + 5, []
        while time.monotonic() < deadline and not caught:
            caught = [name for name in os.listdir(folder) if name.endswith(".tmp") or name not in known]
        os.kill(first.proc.pid, signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
        killed = f"killed after checkpoint {after}, writing {caught}"
        seen = max(e["step"] for e in first.events if e["event"] == "checkpoint")
        assert_checkpoints_load(folder, killed)  # a kill at any moment leaves whole files under the final names

        # the restart writes no checkpoint of its own until it is stopped: the folder is then as
        # the restart left it after cleaning up
        rarely = ["--set", "output.checkpoint_every_steps=100000", "--set", "output.eval_every_steps=100000"]
        restarted = peer("start", recipe, *identity, *rarely, out=tmp_path / "runs", cwd=tmp_path)
        started = restarted.wait_event("started", timeout=60)
        assert started["run_dir"] == str(run_dir)
        assert started["resumed_from"] is not None, (started, killed)
        assert started["step"] >= seen, (started, seen, killed)  # the event comes after the file is in place
        assert Path(started["resumed_from"]) == folder / f"step-{started['step']}.pt"
        assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")], killed
        assert_checkpoints_load(folder, killed)
        restarted.wait_event("progress", lambda e: e["step"] > started["step"], timeout=60)
        assert restarted.stop(signal.SIGTERM) == 0, restarted.stderr[-3000:]
    finally:
        close_all(restarted, first)
    done = restarted.wait_event("finished", timeout=5)
    assert done["reason"] == "stopped" and done["step"] > started["step"]
    assert torch.load(done["checkpoint"], weights_only=True)["step"] == done["step"]
    assert_checkpoints_load(folder)


def assert_checkpoints_load(folder, why=""):
    """Every step-N.pt, latest.pt and best.pt in `folder` is a whole checkpoint that plain torch reads."""
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".pt" and not p.name.startswith("."))
    assert "latest.pt" in names and "best.pt" in names and any(n.startswith("step-") for n in names), (names, why)
    for name in names:
        try:
            state = torch.load(folder / name, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AssertionError(f"{folder / name} does not load ({type(e).__name__}: {e}); {why}") from e
        assert isinstance(state["step"], int) and state["model"], (name, why)
        if name.startswith("step-"):
            assert name == f"step-{state['step']}.pt", (name, state["step"], why)


def snapshot(directory):
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_a_reused_identity_never_touches_the_first_runs_files(tmp_path, recipe):
    out = tmp_path / "runs"
    small = ["--set", f"run.total_samples={20 * BATCH}", "--set", "output.eval_every_steps=10"]
    mine = ["--identity", str(tmp_path / "id.pem")]
    first = peer("start", recipe, *mine, *small, out=out, cwd=tmp_path)
    second = third = None
    try:
        run1 = Path(first.wait_event("started", timeout=60)["run_dir"])
        assert first.wait_event("finished", timeout=60)["reason"] == "run_complete"
        assert first.wait(30) == 0, first.stderr[-3000:]
        before = snapshot(run1)
        assert {"peer.json", "recipe.toml", "metrics.jsonl", "checkpoints/latest.pt"} <= set(before), sorted(before)

        second = peer("start", recipe, *mine, *small, "--fresh", out=out, cwd=tmp_path)
        # another identity, meanwhile: nothing to resume, its own directory
        third = peer("start", recipe, "--identity", str(tmp_path / "other.pem"), *small, out=out, cwd=tmp_path)
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
def test_min_peers_makes_the_starter_wait_then_train_together(tmp_path, recipe):
    starter = peer("start", recipe, "--set", "run.min_peers=2", out=tmp_path / "a", cwd=tmp_path)
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
