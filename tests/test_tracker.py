"""ProgressTracker on real loopback DHTs: peers learn the run's epoch, samples and ETA from each other."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator

import pytest

from hivecli import ConfigError, get_dht_time
from hivecli.dht.records import owned_entries, owned_subkey
from hivecli.optim.tracker import GlobalProgress, LocalProgress, ProgressTracker, parse_record
from hivecli.testing import local_swarm, wait_for

FAST_DHT = {"wait_timeout": 1.0}
FAST = {"min_refresh_period": 0.05, "default_refresh_period": 0.2, "max_refresh_period": 0.3}
TIMEOUT = 10.0
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def swarm():
    with local_swarm(3, **FAST_DHT) as dhts:
        yield dhts


@pytest.fixture
def make_tracker() -> Iterator[Callable[..., ProgressTracker]]:
    """Trackers of one run (a fresh prefix per test), all shut down at the end."""
    prefix = f"tracker-test-{next(_prefixes)}"
    trackers: list[ProgressTracker] = []

    def make(dht, target_batch_size: int = 1_000_000, **kwargs) -> ProgressTracker:
        trackers.append(ProgressTracker(dht, prefix, target_batch_size, **{**FAST, **kwargs}))
        return trackers[-1]

    try:
        yield make
    finally:
        for tracker in trackers:
            tracker.shutdown()


def train(trackers: list[ProgressTracker], steps: int, samples_per_step: int, epoch: int = 0) -> None:
    """Simulated training: every tracker reports `samples_per_step` more samples every 20 ms."""
    for _ in range(steps):
        time.sleep(0.02)  # pacing the simulated steps, so that samples/s is realistic (not a wait)
        for tracker in trackers:
            tracker.report_local_progress(epoch, tracker.local_progress.samples_accumulated + samples_per_step)


def test_peers_sum_their_samples_and_agree_when_the_epoch_is_due(swarm, make_tracker):
    trackers = [make_tracker(dht) for dht in swarm]
    train(trackers, steps=3, samples_per_step=10)
    for tracker in trackers:
        wait_for(lambda t=tracker: t.global_progress.samples_accumulated == 90, TIMEOUT, "the sum of 3 x 30 samples")
        progress = tracker.global_progress
        assert (progress.epoch, progress.num_peers, progress.num_clients) == (0, 3, 0)
        assert progress.target_batch_size == 1_000_000
        assert get_dht_time() < progress.eta_next_epoch < get_dht_time() + 3600
        assert progress.next_fetch_time <= get_dht_time() + FAST["max_refresh_period"] + 1
        assert not tracker.ready_to_update_epoch
        assert tracker.estimated_next_update_time == progress.eta_next_epoch
        assert 0 < tracker.local_progress.samples_per_second < 1e9
    trackers[0].report_local_progress(0, 400_000)
    assert trackers[0].global_progress.samples_accumulated == 400_060  # our own samples count at once
    trackers[1].report_local_progress(0, 300_000)
    trackers[2].report_local_progress(0, 300_000)
    for tracker in trackers:
        wait_for(lambda t=tracker: t.ready_to_update_epoch, TIMEOUT, "the run to reach its target")
        assert tracker.estimated_next_update_time <= get_dht_time()


def test_a_new_epoch_spreads_and_peers_behind_see_it(swarm, make_tracker):
    a, b, c = (make_tracker(dht) for dht in swarm)
    train([a, b, c], steps=2, samples_per_step=5)
    wait_for(lambda: b.global_progress.num_peers == 3, TIMEOUT, "b to see all three peers")
    a.update_epoch(1)
    assert (a.local_progress.epoch, a.local_progress.samples_accumulated, a.global_epoch) == (1, 0, 1)
    for tracker in (b, c):
        wait_for(lambda t=tracker: t.global_epoch == 1, TIMEOUT, "the new epoch to reach the others")
        assert tracker.ready_to_update_epoch  # behind the run
        assert tracker.global_progress.num_peers == 1  # only a is at epoch 1
    b.update_epoch(1)
    wait_for(lambda: c.global_progress.num_peers == 2, TIMEOUT, "c to see a and b at epoch 1")
    c.update_epoch(1)
    wait_for(lambda: a.global_progress.num_peers == 3, TIMEOUT, "all three peers at epoch 1")
    assert not a.ready_to_update_epoch


def test_clients_are_counted_but_do_not_move_the_epoch(swarm, make_tracker):
    trainer, client = make_tracker(swarm[0]), make_tracker(swarm[1], client_mode=True)
    assert client.local_progress.client_mode
    train([trainer, client], steps=2, samples_per_step=7)
    wait_for(lambda: trainer.global_progress.num_clients == 1, TIMEOUT, "the client to be counted")
    wait_for(lambda: trainer.global_progress.samples_accumulated == 28, TIMEOUT, "the client's samples to count")
    assert trainer.global_progress.num_peers == 2
    client.update_epoch(5)
    assert client.global_epoch == 5  # its own epoch still counts for itself
    wait_for(lambda: trainer.global_progress.num_clients == 0, TIMEOUT, "the trainer to see the client's epoch")
    assert trainer.global_epoch == 0 and trainer.global_progress.num_peers == 1
    assert not trainer.ready_to_update_epoch


def test_hostile_records_are_ignored(swarm, make_tracker):
    tracker = make_tracker(swarm[0])
    tracker.report_local_progress(0, 12)
    hostile = swarm[2]
    now = get_dht_time()
    good = {"epoch": 0, "samples_accumulated": 3, "samples_per_second": 1.0, "time": now, "client_mode": False}
    bad = [
        {**good, "epoch": "x"},
        {**good, "epoch": True},
        {**good, "epoch": 2**63},
        {**good, "samples_accumulated": -5},
        {**good, "samples_per_second": math.nan},
        {**good, "samples_per_second": -1.0},
        {**good, "time": math.inf},
        {**good, "time": now - 1000},  # too old to believe
        {**good, "client_mode": "yes"},
        {k: v for k, v in good.items() if k != "time"},
        list(range(20_000)),
        "progress",
        None,
    ]
    expiration = now + 60
    for i, value in enumerate(bad):
        assert hostile.store(tracker.key, value, expiration, subkey=owned_subkey(hostile.peer_id, f"bad{i}"))
    for name in ("a", "b"):  # a valid record, twice: counted once per owner
        assert hostile.store(tracker.key, {**good, "time": now}, expiration, subkey=owned_subkey(hostile.peer_id, name))
    # anybody's word (no owner), claiming a far epoch: ignored
    assert hostile.store(tracker.key, {**good, "epoch": 9}, expiration, subkey="[unowned]")
    stored = len(bad) + 2
    wait_for(
        lambda: len(owned_entries(swarm[0].get(tracker.key, latest=True))) >= stored,
        TIMEOUT,
        "the hostile records to be stored",
    )
    tracker.fetch_now()
    assert tracker.wait_for_update(TIMEOUT) and tracker.wait_for_update(TIMEOUT)
    progress = tracker.global_progress
    assert (progress.epoch, progress.num_peers, progress.samples_accumulated) == (0, 2, 15)
    assert tracker._thread.is_alive()
    tracker.report_local_progress(0, 20)  # and it keeps working
    assert tracker.global_progress.samples_accumulated == 23
    assert tracker.wait_for_update(TIMEOUT) and tracker.global_progress.samples_accumulated == 23


def test_parse_record_bounds_the_speed():
    record = {"epoch": 1, "samples_accumulated": 2, "samples_per_second": 1e30, "time": 5, "client_mode": True}
    assert parse_record(record) == LocalProgress(1, 2, 1e9, 5.0, True)
    assert parse_record({**record, "extra": "ignored"}) is not None


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"target_batch_size": 0}, "target_batch_size = 0"),
        ({"target_batch_size": "64"}, "target_batch_size = '64'"),
        ({"target_batch_size": True}, "target_batch_size = True"),
        ({"min_refresh_period": 5.0}, "min_refresh_period = 5.0"),
        ({"min_refresh_period": 0}, "min_refresh_period = 0"),
        ({"max_refresh_period": 1.0}, "max_refresh_period = 1.0"),
        ({"metadata_expiration": 0}, "metadata_expiration = 0"),
        ({"performance_ema_alpha": 2}, "performance_ema_alpha = 2"),
        ({"expected_drift_rate": -0.1}, "expected_drift_rate = -0.1"),
        ({"expected_drift_peers": math.nan}, "expected_drift_peers = nan"),
    ],
)
def test_settings_are_checked(swarm, kwargs, named):
    settings = {"target_batch_size": 32, **kwargs}
    with pytest.raises(ConfigError, match="must") as info:
        ProgressTracker(swarm[0], "tracker-config", settings.pop("target_batch_size"), **settings)
    assert named in str(info.value)


def test_bad_reports_are_refused(swarm, make_tracker):
    tracker = make_tracker(swarm[0], start=False)
    with pytest.raises(ConfigError, match="-1"):
        tracker.report_local_progress(0, -1)
    with pytest.raises(ConfigError, match="'1'"):
        tracker.update_epoch("1")
    assert tracker.local_progress == LocalProgress(0, 0, 0.0, tracker.local_progress.time, False)
    assert isinstance(tracker.global_progress, GlobalProgress)


def test_shutdown_joins_withdraws_and_is_idempotent(swarm, make_tracker):
    leaving, staying = make_tracker(swarm[0]), make_tracker(swarm[1])
    leaving.report_local_progress(0, 4)
    wait_for(lambda: staying.global_progress.num_peers == 2, TIMEOUT, "both peers to see each other")
    thread = leaving._thread
    with leaving:
        pass  # __exit__ shuts down
    assert not thread.is_alive()
    leaving.shutdown()
    leaving.shutdown(timeout=0.1)
    assert not thread.is_alive()
    wait_for(lambda: staying.global_progress.num_peers == 1, TIMEOUT, "the withdrawn record to be gone")
    assert staying.global_progress.samples_accumulated == 0
