"""What keeps a long run healthy: schedules, the divergence guard, the run's sample counter,
checkpoint files, run directories, and two real Trainers in one process (a NaN injected into
one is rolled back and never reaches the other)."""

import json
import math
import threading

import pytest
import torch

from hivecli._exceptions import ConfigError
from hivecli.checkpoints import CheckpointStore, atomic_save
from hivecli.guard import DivergenceGuard
from hivecli.progress import RunCounter, is_live
from hivecli.recipe import load_recipe
from hivecli.rundir import claim, is_run_id, new_run_id, peer_dir, resumable_run
from hivecli.schedule import Schedule
from hivecli.testing import local_swarm, wait_for
from hivecli.training import Trainer, goal_samples

# ---- schedules ----------------------------------------------------------------------------------------


def test_warmup_rises_linearly_then_holds():
    s = Schedule("constant", warmup_steps=10)
    assert [round(s.factor(step, None), 2) for step in (0, 4, 9, 50)] == [0.1, 0.5, 1.0, 1.0]


def test_cosine_and_linear_decay_follow_the_run_not_the_step():
    cosine, linear = Schedule("cosine", final_fraction=0.1), Schedule("linear")
    assert cosine.factor(123, 0.0) == pytest.approx(1.0)
    assert cosine.factor(5, 0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine.factor(0, 1.0) == pytest.approx(0.1) == cosine.factor(0, 7.0)  # past the goal: the floor
    assert linear.factor(99, 0.25) == pytest.approx(0.75)
    assert linear.factor(0, None) == 1.0  # no goal: nothing to decay over


# ---- the divergence guard -----------------------------------------------------------------------------


def test_guard_flags_non_finite_losses_at_once():
    guard = DivergenceGuard()
    assert guard.check(float("nan")) == "loss nan is not finite"
    assert "not finite" in guard.check(float("inf"))
    assert guard.check(2.3) is None


def test_guard_tolerates_noise_and_a_hard_batch_but_flags_a_climb():
    guard = DivergenceGuard()
    for i in range(300):
        assert guard.check(0.05 + 0.04 * math.sin(i)) is None
    assert guard.check(1.5) is None  # one hard batch of a well-trained model
    problems = [guard.check(2.3) for _ in range(30)]  # the model collapsed to chance
    assert any(p is not None and "far above its recent level" in p for p in problems)


def test_guard_flags_an_explosion_in_the_first_steps():
    guard = DivergenceGuard()
    assert guard.check(2.31) is None
    assert "far above its recent level" in guard.check(93005896.0)  # seen with lr = 1000 at step 2


def test_guard_does_not_judge_a_falling_loss():
    guard = DivergenceGuard()
    assert all(guard.check(2.3 * 0.99**i) is None for i in range(1000))


# ---- the run's sample counter -------------------------------------------------------------------------


def test_counter_merges_by_peer_maximum_and_never_double_counts():
    a, b = RunCounter(), RunCounter()
    a.add("A", 100)
    b.add("B", 50)
    a.merge(b.counts())
    a.merge(b.counts())  # merging twice changes nothing
    b.merge(a.counts())
    assert a.total == b.total == 150
    a.add("A", 10)
    b.merge({"A": 20})  # an older view of A is ignored
    assert b.counts() == {"A": 100, "B": 50}


def test_counter_ignores_hostile_entries_and_keeps_reported_totals():
    c = RunCounter({"A": 5})
    c.merge({"B": -3, 7: 9, "C": "lots", "D": 2.5, "E" * 500: 10})
    c.merge("not a dict")
    assert c.counts() == {"A": 5}
    c.merge({}, reported_total=40)  # another peer knew of peers that left before we came
    assert c.total == 40


def test_a_record_is_live_while_recent_and_not_a_goodbye():
    assert is_live({"time": 100.0}, now=105.0, period=2.0)
    assert not is_live({"time": 100.0}, now=120.0, period=2.0)
    assert not is_live({"time": 100.0, "left": True}, now=100.5, period=2.0)
    assert not is_live({"time": "yesterday"}, now=100.0, period=2.0)


# ---- checkpoints --------------------------------------------------------------------------------------


def state(step):
    return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "step": step}


def test_store_keeps_the_last_n_and_the_best(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep=2)
    for step, accuracy in ((10, 0.5), (20, 0.9), (30, 0.7), (40, 0.6)):
        store.save(state(step))
        store.offer_best(state(step), accuracy)
    assert [p.name for p in store.step_files()] == ["step-30.pt", "step-40.pt"]
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert (best["step"], best["metric"]) == (20, 0.9)
    assert torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)["step"] == 40
    assert CheckpointStore(tmp_path / "checkpoints", keep=2).best_metric == 0.9  # remembered across restarts


def test_latest_skips_a_damaged_file_and_leftovers_are_removed(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    store = CheckpointStore(folder, keep=5)
    store.save(state(1))
    good = (folder / "step-1.pt").read_bytes()
    (folder / "step-2.pt").write_bytes(good[: len(good) // 2])  # what a non-atomic writer would leave
    (folder / ".step-3.pt.tmp").write_bytes(b"half")
    reopened = CheckpointStore(folder, keep=5)
    path, loaded = reopened.latest()
    assert (path.name, loaded["step"]) == ("step-1.pt", 1)
    assert "Skipping checkpoint" in caplog.text and not (folder / ".step-3.pt.tmp").exists()


def test_atomic_save_leaves_the_old_file_when_saving_fails(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save(state(1), path)
    with pytest.raises(Exception):  # noqa: B017  (pickling a lambda: torch raises its own type)
        atomic_save({"step": 2, "bad": lambda: 0}, path)
    assert torch.load(path, weights_only=True)["step"] == 1


# ---- run directories ----------------------------------------------------------------------------------


def test_run_ids_sort_by_age_and_a_directory_belongs_to_one_peer(tmp_path):
    run_id = new_run_id()
    assert is_run_id(run_id) and not is_run_id("../../etc")
    directory = peer_dir(tmp_path, "demo", run_id, "12D3KooWAAAAAAAAAAAAbbbbbbbbbbbb")
    claim(directory, "demo", run_id, "12D3KooWAAAAAAAAAAAAbbbbbbbbbbbb")
    claim(directory, "demo", run_id, "12D3KooWAAAAAAAAAAAAbbbbbbbbbbbb")  # the same peer again: fine
    with pytest.raises(ConfigError, match="belongs to another peer or run"):
        claim(directory, "demo", run_id, "12D3KooWZZZZZZZZZZZZbbbbbbbbbbbb")  # same last 12 characters
    assert json.loads((directory / "peer.json").read_text())["run_id"] == run_id


def test_resumable_run_is_the_newest_with_a_checkpoint_of_this_peer(tmp_path):
    peer = "12D3KooWxyzxyzxyzxyz"
    for run_id, has_checkpoint in (("20260101-000000-aaaa", True), ("20260301-000000-bbbb", True),
                                   ("20260401-000000-cccc", False)):  # fmt: skip
        folder = peer_dir(tmp_path, "demo", run_id, peer) / "checkpoints"
        folder.mkdir(parents=True)
        if has_checkpoint:
            atomic_save(state(1), folder / "step-1.pt")
    assert resumable_run(tmp_path, "demo", peer) == "20260301-000000-bbbb"
    assert resumable_run(tmp_path, "demo", "12D3KooWsomeoneelse") is None
    assert resumable_run(tmp_path, "other", peer) is None


def test_goal_in_samples_or_epochs_or_none():
    assert goal_samples(load_recipe(None, ["run.total_samples=1000"], env={}), 300) == 1000
    assert goal_samples(load_recipe(None, ["run.total_epochs=2.5"], env={}), 300) == 750
    assert goal_samples(load_recipe(None, env={}), 300) is None


# ---- two real trainers --------------------------------------------------------------------------------


class Events:
    def __init__(self):
        self.seen = []

    def __call__(self, name, fields):
        self.seen.append((name, dict(fields)))

    def named(self, name):
        return [fields for event, fields in self.seen if event == name]


@pytest.mark.slow
def test_a_nan_is_rolled_back_and_never_reaches_the_partner(tmp_path):
    overrides = [
        f'output.dir="{tmp_path}"', "output.report_every_seconds=0.5", "output.eval_every_steps=100000",
        "output.checkpoint_every_steps=20", "averaging.target_group_size=2", "averaging.min_matchmaking_time=1.0",
        "averaging.request_timeout=0.5", "run.prefix=nan-test", "model.name=\"mlp\"", "data.batch_size=16",
    ]  # fmt: skip
    recipe = load_recipe(None, overrides, env={})
    stop = threading.Event()
    with local_swarm(2, wait_timeout=1.0) as dhts:
        events = [Events(), Events()]
        trainers = [
            Trainer(recipe, dht, tmp_path / f"peer{i}", events[i], run_id=new_run_id(), joining=False)
            for i, dht in enumerate(dhts)
        ]
        threads = [threading.Thread(target=t.run, args=(stop,)) for t in trainers]
        try:
            for thread in threads:
                thread.start()
            wait_for(lambda: all(t.opt.rounds_finished >= 3 for t in trainers), 60, "both peers to average")
            sick, healthy = trainers
            with sick.opt.lock_parameters, torch.no_grad():
                next(sick.model.parameters()).fill_(float("nan"))
            wait_for(lambda: events[0].named("rolled_back"), 60, "the sick peer to roll back")
            target = healthy.opt.rounds_finished + 5
            while (seen := healthy.opt.rounds_finished) < target:  # they average on afterwards
                assert all(torch.isfinite(p).all() for p in healthy.model.parameters())
                wait_for(lambda seen=seen: healthy.opt.rounds_finished > seen, 60, "more rounds")
            assert all(torch.isfinite(p).all() for t in trainers for p in t.model.parameters())
            rolled = events[0].named("rolled_back")[0]
            assert "not finite" in rolled["reason"] and rolled["source"]
            assert not events[1].named("rolled_back")
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            for trainer in trainers:
                trainer.close()
        assert not any(thread.is_alive() for thread in threads)


# ---- sharing the machine's cores ----------------------------------------------------------------------


def test_training_peers_are_recognised_by_their_command_line():
    from hivecli.cores import is_training_peer

    assert is_training_peer(["/venv/bin/python", "/venv/bin/hive", "start", "recipe.toml"])
    assert is_training_peer(["python", "-m", "hivecli.cli.main", "join", "/ip4/1.2.3.4/tcp/5/p2p/x"])
    assert not is_training_peer(["/venv/bin/hive", "peers", "/ip4/1.2.3.4/tcp/5/p2p/x"])
    assert not is_training_peer(["python", "-m", "hivecli.cli.main", "local", "3", "recipe.toml"])
    assert not is_training_peer(["vim", "start"])


def test_each_peer_gets_its_share_of_the_cores_unless_the_user_chose(monkeypatch):
    from hivecli import cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cores, "usable_cores", lambda: 8)
    monkeypatch.setattr(cores, "training_peers_here", lambda: 3)
    assert cores.fair_share() == (3, 2)
    monkeypatch.setattr(cores, "training_peers_here", lambda: 12)
    assert cores.fair_share() == (12, 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert cores.fair_share() is None
    assert cores.cores_per_peer() == 1  # what a peer's data plane counts on, whatever the threads
    monkeypatch.setattr(cores, "training_peers_here", lambda: 3)
    assert cores.cores_per_peer() == 2


def test_usable_cores_are_at_most_a_containers_cpu_quota(tmp_path, monkeypatch):
    from hivecli import cores

    v2, quota, period = tmp_path / "cpu.max", tmp_path / "cfs_quota_us", tmp_path / "cfs_period_us"
    monkeypatch.setattr(cores, "CGROUP_V2_CPU_MAX", str(v2))
    monkeypatch.setattr(cores, "CGROUP_V1_CPU_QUOTA", (str(quota), str(period)))
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert (cores.cgroup_cpu_quota(), cores.usable_cores()) == (None, 64)  # no cgroup files: no quota
    seen = []
    for text in ("150000 100000\n", "800000 100000", "max 100000\n", "9000000 100000", "0 100000", "abc"):
        v2.write_text(text)
        seen.append((cores.cgroup_cpu_quota(), cores.usable_cores()))
    assert seen == [(1.5, 2), (8.0, 8), (None, 64), (90.0, 64), (None, 64), (None, 64)]
    v2.unlink()  # cgroup v1
    period.write_text("100000\n")
    quota.write_text("-1\n")
    assert (cores.cgroup_cpu_quota(), cores.usable_cores()) == (None, 64)
    quota.write_text("300000\n")
    assert (cores.cgroup_cpu_quota(), cores.usable_cores()) == (3.0, 3)


def test_one_thread_for_the_averaging_thread_leaves_the_others_as_they_were():
    from hivecli import cores

    torch.set_num_threads(2)  # the machine may have one core; OpenMP honours the request anyway
    seen: dict[str, object] = {}

    def averaging_thread() -> None:
        seen["limited"] = cores.single_threaded_here()
        seen["threads"] = torch.get_num_threads()
        seen["sum"] = torch.arange(100_000, dtype=torch.float64).sum().item()  # ops still run

    worker = threading.Thread(target=averaging_thread)
    worker.start()
    worker.join(timeout=30)
    assert seen == {"limited": True, "threads": 1, "sum": 4999950000.0}
    assert torch.get_num_threads() == 2  # the calling (training) thread keeps its threads
    later: list[int] = []
    other = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    other.start()
    other.join(timeout=30)
    assert later == [2]  # and so do threads started afterwards
