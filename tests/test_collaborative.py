"""`Optimizer` (hivemind 1.x's collaborative optimizer) on real loopback DHTs, in one process.

Each peer trains in its own thread with its own DHT, as separate machines would. A training
step sleeps STEP_TIME to stand for the compute of a batch (pacing, not a wait on a condition):
peers then interleave their steps as real ones do. Whatever the tests wait for, they wait for
with a deadline; every optimizer is shut down whatever happens.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from hivecli import ConfigError
from hivecli.averaging import Stage
from hivecli.optim.collaborative import Optimizer
from hivecli.testing import local_swarm, torch_devices, wait_for

DHT_FAST = {"wait_timeout": 1.0}
TRACKER_FAST = {"min_refresh_period": 0.1, "default_refresh_period": 0.5}
FAST = {"matchmaking_time": 2.0, "averaging_timeout": 10.0, "load_state_timeout": 20.0, "tracker_opts": TRACKER_FAST}
LONE = {**FAST, "matchmaking_time": 1.0, "averaging_timeout": 2.0}  # a lone peer gives up on its rounds within seconds
IN, OUT, BATCH = 8, 2, 4
STEPS_PER_EPOCH = 4  # steps each peer takes per epoch: target_batch_size = peers * STEPS_PER_EPOCH * BATCH
STEP_TIME = 0.02
TRAIN_DEADLINE = 60.0  # a training loop gives up after this long (a bug must not hang the test run)
JOIN_TIMEOUT = 75.0
# where the models of the tests parametrized by `device` train: a GPU too, on a machine that has one
# (the optimizer averages CPU copies of what lives on the device)
DEVICES = torch_devices()


def linear(seed: int, device: str = "cpu") -> torch.nn.Linear:
    """A small model whose parameters depend on `seed` only (not on the global RNG, which
    threads would race on)."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(IN, OUT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.to(device)


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def batches(seed: int, device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        x, y = torch.randn(BATCH, IN, generator=gen), torch.randint(0, OUT, (BATCH,), generator=gen)
        yield x.to(device), y.to(device)


def collaborative(dht, model, target_batch_size, lr=0.1, **kwargs) -> Optimizer:
    options = {"run_id": "collab", "batch_size_per_step": BATCH, **FAST, **kwargs}
    return Optimizer(
        dht=dht,
        target_batch_size=target_batch_size,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        **options,
    )


def train_step(opt: Optimizer, model: torch.nn.Module, data: Iterator[Any]) -> None:
    x, y = next(data)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def train(
    opt: Optimizer,
    model: torch.nn.Module,
    seed: int,
    until: Callable[[], int],
    on_epoch: Callable[[Optimizer], None] | None = None,
    on_step: Callable[[Optimizer], None] | None = None,
) -> int:
    """Train on the peer's own data until its epoch reaches `until()`; call `on_epoch` after
    each step that changed the epoch. Returns the number of step() calls."""
    data, calls = batches(seed, next(model.parameters()).device), 0
    deadline = time.monotonic() + TRAIN_DEADLINE
    while opt.local_epoch < until():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{opt!r} did not reach epoch {until()} within {TRAIN_DEADLINE} s")
        if on_step is not None:
            on_step(opt)
        epoch = opt.local_epoch
        train_step(opt, model, data)
        calls += 1
        if opt.local_epoch != epoch and on_epoch is not None:
            on_epoch(opt)
        time.sleep(STEP_TIME)  # the compute of a batch
    return calls


class Threads:
    """Peers' threads: their exceptions are re-raised by `join`, which fails if one still runs."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.errors: list[tuple[str, BaseException]] = []
        self.results: dict[str, Any] = {}

    def start(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        def run() -> None:
            try:
                self.results[name] = fn(*args, **kwargs)
            except BaseException as e:
                self.errors.append((name, e))

        thread = threading.Thread(target=run, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    def join(self, timeout: float = JOIN_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.errors:
            name, error = self.errors[0]
            raise AssertionError(f"peer {name} failed: {error!r}") from error
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"threads still running after {timeout} s: {alive}"


@contextlib.contextmanager
def shut_down_at_exit() -> Iterator[list[Optimizer]]:
    opts: list[Optimizer] = []
    try:
        yield opts
    finally:
        for opt in opts:
            opt.shutdown()


def assert_identical(snapshots: list[list[torch.Tensor]], what: str) -> None:
    for i, params in enumerate(snapshots[1:], start=1):
        for mine, first in zip(params, snapshots[0], strict=True):
            assert torch.equal(mine, first), f"{what}: peer {i} differs from peer 0 by {(mine - first).abs().max()}"


def max_spread(snapshots: list[list[torch.Tensor]]) -> float:
    return max(
        float((a - b).abs().max()) for params in snapshots[1:] for a, b in zip(params, snapshots[0], strict=True)
    )


# ---- gradient averaging -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_four_peers_average_gradients_and_stay_bitwise_identical(device):
    n, epochs = 4, 3
    init = linear(seed=0, device=device)
    models = [linear(seed=0, device=device) for _ in range(n)]
    snaps: list[dict[int, list[torch.Tensor]]] = [{} for _ in range(n)]
    rounds: list[dict[int, tuple[int, int, int]]] = [{} for _ in range(n)]

    def recorder(i: int, model: torch.nn.Module) -> Callable[[Optimizer], None]:
        def on_epoch(opt: Optimizer) -> None:
            snaps[i][opt.local_epoch] = params_of(model)
            rounds[i][opt.local_epoch] = (opt.rounds_finished, opt.rounds_failed, opt.last_group_size)

        return on_epoch

    with local_swarm(n, **DHT_FAST) as dhts, shut_down_at_exit() as opts:
        target = n * STEPS_PER_EPOCH * BATCH
        opts += [collaborative(dht, model, target) for dht, model in zip(dhts, models, strict=True)]
        threads = Threads()
        for i, (opt, model) in enumerate(zip(opts, models, strict=True)):
            threads.start(
                f"peer-{i}", train, opt, model, seed=100 + i, until=lambda: epochs, on_epoch=recorder(i, model)
            )
        threads.join()

        for i in range(n):
            assert sorted(snaps[i]) == list(range(1, epochs + 1)), f"peer {i} went through epochs {sorted(snaps[i])}"
            assert opts[i].local_epoch == epochs
            previous = 0
            for epoch in range(1, epochs + 1):
                finished, failed, group_size = rounds[i][epoch]
                assert failed == 0, f"peer {i}: a round failed by epoch {epoch}"
                assert finished > previous, f"peer {i}: epoch {epoch}'s step averaged nothing"
                assert group_size == n, f"peer {i}: epoch {epoch}'s gradients averaged in a group of {group_size}"
                previous = finished
        for epoch in range(1, epochs + 1):
            assert_identical([snaps[i][epoch] for i in range(n)], f"parameters at epoch {epoch}")
        assert max_spread([snaps[0][epochs], params_of(init)]) > 1e-3  # they did train
        assert all(p.device.type == device for model in models for p in model.parameters())


def test_a_trainer_whose_last_batch_outlasts_request_timeout_still_averages():
    """One trainer's last batch of each epoch ends 2.5 s after its group formed and the others
    started the all-reduce: 2.5x request_timeout (1 s here), after which they used to drop it
    as a no-show. It says "pending" while it finishes, and they wait for it."""
    n, epochs, slow_batch = 3, 3, 2.5
    models = [linear(seed=0) for _ in range(n)]
    snaps: list[dict[int, list[torch.Tensor]]] = [{} for _ in range(n)]
    rounds: list[dict[int, tuple[int, int]]] = [{} for _ in range(n)]
    slow_epochs: list[int] = []

    def recorder(i: int, model: torch.nn.Module) -> Callable[[Optimizer], None]:
        def on_epoch(opt: Optimizer) -> None:
            snaps[i][opt.local_epoch] = params_of(model)
            rounds[i][opt.local_epoch] = (opt.rounds_failed, opt.last_group_size)

        return on_epoch

    def slow_last_batch(opt: Optimizer) -> None:
        """Once this epoch's round has its group and the others have closed the epoch, the
        batch in progress takes `slow_batch` seconds more."""
        grad_round = opt._grad_round
        if grad_round is None or opt.local_epoch in slow_epochs or grad_round.done():
            return
        wait_for(
            lambda: grad_round.stage is Stage.AWAITING_TRIGGER and opt.tracker.ready_to_update_epoch,
            timeout=30,
            what="the epoch's group and the others' end of the epoch",
        )
        slow_epochs.append(opt.local_epoch)
        time.sleep(slow_batch)  # the compute of the batch that ends after the others' (the lateness under test)

    with local_swarm(n, **DHT_FAST) as dhts, shut_down_at_exit() as opts:
        target = n * STEPS_PER_EPOCH * BATCH
        opts += [collaborative(dht, model, target) for dht, model in zip(dhts, models, strict=True)]
        threads = Threads()
        for i, (opt, model) in enumerate(zip(opts, models, strict=True)):
            on_step = slow_last_batch if i == n - 1 else None
            threads.start(f"peer-{i}", train, opt, model, 100 + i, lambda: epochs, recorder(i, model), on_step)
        threads.join()

        for epoch in range(1, epochs + 1):
            for i in range(n):
                assert rounds[i].get(epoch) == (0, n), f"peer {i}'s round of epoch {epoch}: (failed, group size)"
            assert_identical([snaps[i][epoch] for i in range(n)], f"parameters at epoch {epoch}")
        # in epoch 0 nobody knows the run's rate yet, and its round may start only at the epoch's end
        assert set(slow_epochs) >= {1, 2}, f"the slow trainer's last batch ran late in epochs {slow_epochs} only"


@pytest.mark.parametrize("device", DEVICES)
def test_late_joiner_loads_the_run_state_then_steps_in_sync(device):
    n_trainers = 3
    models = [linear(seed=0, device=device) for _ in range(n_trainers)]
    newcomer_model = linear(seed=1, device=device)  # another init: only a download can make it equal the trainers'
    target = n_trainers * STEPS_PER_EPOCH * BATCH
    snaps: list[dict[int, list[torch.Tensor]]] = [{} for _ in range(n_trainers + 1)]
    final = {"epoch": 10**6}  # set once the newcomer has joined

    def recorder(i: int, model: torch.nn.Module) -> Callable[[Optimizer], None]:
        return lambda opt: snaps[i].__setitem__(opt.local_epoch, params_of(model))

    with local_swarm(n_trainers + 1, **DHT_FAST) as dhts, shut_down_at_exit() as opts:
        opts += [collaborative(dht, model, target) for dht, model in zip(dhts[:n_trainers], models, strict=True)]
        threads = Threads()
        try:
            for i, (opt, model) in enumerate(zip(opts, models, strict=True)):
                threads.start(f"trainer-{i}", train, opt, model, 100 + i, lambda: final["epoch"], recorder(i, model))
            wait_for(lambda: all(opt.local_epoch >= 2 for opt in opts), 40, "the trainers to pass epoch 2")

            newcomer = collaborative(dhts[-1], newcomer_model, target)
            opts.append(newcomer)
            wait_for(lambda: newcomer.tracker.global_epoch >= 2, 20, "the newcomer to see the run's epoch")
            seen = newcomer.tracker.global_epoch
            train_step(
                newcomer, newcomer_model, batches(seed=200, device=device)
            )  # behind the run: loads its state instead
            joined = newcomer.local_epoch
            assert seen <= joined <= seen + 1, f"the newcomer saw epoch {seen} and is at {joined}"
            loaded = params_of(newcomer_model)
            final["epoch"] = joined + 2
            # a donor served its parameters of that epoch (before or after that epoch's state round, which
            # averages identical parameters: the same up to rounding)
            wait_for(lambda: joined in snaps[0], 20, f"trainer 0 to record epoch {joined}")
            for mine, theirs in zip(loaded, snaps[0][joined], strict=True):
                torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)
            threads.start(
                "newcomer", train, newcomer, newcomer_model, 200, lambda: final["epoch"], recorder(-1, newcomer_model)
            )
        except BaseException:
            final["epoch"] = 0  # stop the trainers, then report what went wrong
            with contextlib.suppress(AssertionError):
                threads.join()
            raise
        threads.join()

        assert all(opt.local_epoch == final["epoch"] for opt in opts)
        assert sorted(snaps[-1]) == list(range(joined + 1, final["epoch"] + 1)), "the newcomer skipped an epoch"
        # from the next epoch on, it took part in every round; the state round of epoch joined+1 removed the
        # last rounding difference, and the step of epoch joined+2 was the same on every peer
        assert_identical([snaps[i][final["epoch"]] for i in range(n_trainers + 1)], "parameters after the join")
        assert newcomer.rounds_finished >= 2 and newcomer.last_group_size == n_trainers + 1


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_load_state_from_peers_takes_epoch_parameters_and_momentum(device):
    veteran_model, newcomer_model = linear(seed=0, device=device), linear(seed=1, device=device)
    with local_swarm(2, **DHT_FAST) as (dht_a, dht_b), shut_down_at_exit() as opts:
        veteran = Optimizer(
            dht=dht_a, run_id="load", target_batch_size=64, batch_size_per_step=BATCH,
            optimizer=torch.optim.SGD(veteran_model.parameters(), lr=0.1, momentum=0.9), **FAST,
        )  # fmt: skip
        opts.append(veteran)
        veteran_model(torch.randn(BATCH, IN, device=device)).sum().backward()
        veteran.opt.step()  # a momentum buffer that is not zero, outside any epoch
        veteran.load_state_dict({**veteran.state_dict(), "local_epoch": 5})  # as if it had trained 5 epochs
        newcomer = Optimizer(
            dht=dht_b, run_id="load", target_batch_size=64, batch_size_per_step=BATCH,
            optimizer=torch.optim.SGD(newcomer_model.parameters(), lr=0.1, momentum=0.9), **FAST,
        )  # fmt: skip
        opts.append(newcomer)
        # the download refuses (and bans) a donor whose epoch is beyond what this peer's tracker has seen
        wait_for(lambda: newcomer.tracker.global_epoch == 5, 20, "the newcomer to see the run's epoch")
        assert newcomer.local_epoch == 0
        assert newcomer.load_state_from_peers(timeout=20) is True
        assert newcomer.local_epoch == 5
        assert newcomer.tracker.local_progress.epoch == 5
        for mine, theirs in zip(newcomer_model.parameters(), veteran_model.parameters(), strict=True):
            assert torch.equal(mine, theirs)
            assert torch.equal(newcomer.state[mine]["momentum_buffer"], veteran.state[theirs]["momentum_buffer"])
            assert bool(newcomer.state[mine]["momentum_buffer"].abs().sum() > 0)


# ---- local updates, auxiliary peers, schedulers -----------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_local_updates_step_every_call_and_average_parameters_each_epoch(device):
    n, epochs = 3, 2
    models = [linear(seed=0, device=device) for _ in range(n)]
    before: list[dict[int, list[torch.Tensor]]] = [{} for _ in range(n)]
    after: list[dict[int, list[torch.Tensor]]] = [{} for _ in range(n)]
    finished: list[dict[int, int]] = [{} for _ in range(n)]

    def peer(i: int, opt: Optimizer, model: torch.nn.Module) -> None:
        data, deadline = batches(seed=100 + i, device=device), time.monotonic() + TRAIN_DEADLINE
        for epoch in range(1, epochs + 1):
            while opt.local_epoch < epoch:
                assert time.monotonic() < deadline, f"peer {i} did not reach epoch {epoch}"
                last = params_of(model)
                train_step(opt, model, data)
                assert max_spread([params_of(model), last]) > 0, "a step() did not update the parameters"
                time.sleep(STEP_TIME)  # the compute of a batch
            before[i][epoch] = params_of(model)  # what this epoch's state round took (its snapshot)
            assert opt.wait_for_averaging(30.0) is True  # the round found its group; its result is applied
            after[i][epoch] = params_of(model)
            finished[i][epoch] = opt.rounds_finished

    with local_swarm(n, **DHT_FAST) as dhts, shut_down_at_exit() as opts:
        target = n * STEPS_PER_EPOCH * BATCH
        opts += [
            # every epoch's round gathers its group for matchmaking_time: 5 s rather than 2 keeps a peer
            # that a loaded machine held back in the group (on a 2-core CI run one missed it once); ~8 s more
            collaborative(dht, model, target, use_local_updates=True, matchmaking_time=5.0)
            for dht, model in zip(dhts, models, strict=True)
        ]
        threads = Threads()
        for i, (opt, model) in enumerate(zip(opts, models, strict=True)):
            threads.start(f"peer-{i}", peer, i, opt, model)
        threads.join()
        assert all(opt.rounds_failed == 0 and opt.last_group_size == n for opt in opts)

    for epoch in range(1, epochs + 1):
        spread_before = max_spread([before[i][epoch] for i in range(n)])
        spread_after = max_spread([after[i][epoch] for i in range(n)])
        assert spread_before > 1e-3, "peers trained on different data: their parameters should differ"
        assert spread_after < spread_before / 1000
        mean = [torch.stack(ps).mean(0) for ps in zip(*(before[i][epoch] for i in range(n)), strict=True)]
        for i in range(n):
            for mine, expected in zip(after[i][epoch], mean, strict=True):
                torch.testing.assert_close(mine, expected, atol=1e-6, rtol=0)
            assert finished[i][epoch] == epoch
    for i in range(n):  # the steps between the two rounds were local: the parameters moved apart again
        assert max_spread([before[i][2], after[i][1]]) > 1e-3


def test_auxiliary_peer_helps_average_gradients():
    n_trainers, epochs = 3, 2
    models = [linear(seed=0) for _ in range(n_trainers)]
    snaps: list[dict[int, list[torch.Tensor]]] = [{} for _ in range(n_trainers)]
    group_sizes: list[dict[int, int]] = [{} for _ in range(n_trainers)]

    def recorder(i: int, model: torch.nn.Module) -> Callable[[Optimizer], None]:
        def on_epoch(opt: Optimizer) -> None:
            snaps[i][opt.local_epoch] = params_of(model)
            group_sizes[i][opt.local_epoch] = opt.last_group_size

        return on_epoch

    def helper(aux: Optimizer) -> int:
        deadline, calls = time.monotonic() + TRAIN_DEADLINE, 0
        while aux.local_epoch < epochs:  # each call waits for the run's progress (at most 1 s) or averages
            assert time.monotonic() < deadline, "the auxiliary peer never reached the run's end"
            assert aux.step() is None
            calls += 1
        return calls

    with local_swarm(n_trainers + 1, **DHT_FAST) as dhts, shut_down_at_exit() as opts:
        target = n_trainers * STEPS_PER_EPOCH * BATCH
        opts += [collaborative(dht, model, target) for dht, model in zip(dhts[:n_trainers], models, strict=True)]
        aux = Optimizer(
            dht=dhts[-1], run_id="collab", target_batch_size=target, auxiliary=True,
            optimizer=torch.optim.SGD(linear(seed=7).parameters(), lr=0.1), **FAST,
        )  # fmt: skip
        opts.append(aux)
        threads = Threads()
        for i, (opt, model) in enumerate(zip(opts[:n_trainers], models, strict=True)):
            threads.start(f"trainer-{i}", train, opt, model, 100 + i, lambda: epochs, recorder(i, model))
        threads.start("aux", helper, aux)
        threads.join()

        assert aux.rounds_finished == epochs and aux.rounds_failed == 0
        assert aux.last_group_size == n_trainers + 1
        for epoch in range(1, epochs + 1):
            for i in range(n_trainers):
                assert group_sizes[i][epoch] == n_trainers + 1, f"trainer {i}'s round of epoch {epoch}"
            assert_identical([snaps[i][epoch] for i in range(n_trainers)], f"trainers' parameters at epoch {epoch}")


def test_scheduler_steps_once_per_epoch():
    n, epochs, lr0 = 2, 3, 0.1
    models = [linear(seed=0) for _ in range(n)]
    seen_lrs: list[list[tuple[int, float]]] = [[] for _ in range(n)]

    def lr_recorder(i: int) -> Callable[[Optimizer], None]:
        return lambda opt: seen_lrs[i].append((opt.local_epoch, opt.param_groups[0]["lr"]))

    def step_lr(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.StepLR:
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    with local_swarm(n, **DHT_FAST) as dhts, shut_down_at_exit() as opts:
        target = n * STEPS_PER_EPOCH * BATCH
        opts += [
            collaborative(dht, model, target, lr=lr0, scheduler=step_lr)
            for dht, model in zip(dhts, models, strict=True)
        ]
        threads = Threads()
        for i, (opt, model) in enumerate(zip(opts, models, strict=True)):
            threads.start(f"peer-{i}", train, opt, model, 100 + i, lambda: epochs, on_step=lr_recorder(i))
        threads.join()

        for i, opt in enumerate(opts):
            assert threads.results[f"peer-{i}"] > epochs  # step() was called many more times than the scheduler
            assert opt.local_epoch == epochs
            assert opt.param_groups[0]["lr"] == lr0 * 0.5**epochs
            assert opt.scheduler.last_epoch == epochs
            assert {epoch for epoch, _ in seen_lrs[i]} == set(range(epochs))
            for epoch, lr in seen_lrs[i]:
                assert lr == lr0 * 0.5**epoch, f"peer {i} stepped at epoch {epoch} with lr {lr}"


# ---- a peer alone -------------------------------------------------------------------------------------------


def test_lone_peer_proceeds_with_local_gradients(caplog):
    model, lr = linear(seed=0), 0.1
    init = params_of(model)
    data, used = batches(seed=5), []
    with local_swarm(1, **DHT_FAST) as (dht,), shut_down_at_exit() as opts:
        opt = collaborative(dht, model, target_batch_size=STEPS_PER_EPOCH * BATCH, lr=lr, run_id="alone", **LONE)
        opts.append(opt)
        with caplog.at_level(logging.INFO, logger="hivecli.optim"):
            while opt.local_epoch == 0:  # the epoch ends at target_batch_size, or earlier if its ETA comes first
                assert len(used) < STEPS_PER_EPOCH, "the epoch did not end at target_batch_size"
                used.append(next(data))
                opt.zero_grad()
                F.cross_entropy(model(used[-1][0]), used[-1][1]).backward()
                opt.step()
        assert opt.local_epoch == 1
        assert opt.rounds_failed >= 1 and opt.rounds_finished == 0
        records = [r for r in caplog.records if "proceeding with local gradients" in r.getMessage()]
        assert records and records[0].levelno == logging.INFO, caplog.text  # nobody else: not a warning

    reference = linear(seed=0)  # the step a peer alone takes: with the mean gradient of its batches
    mean_grad = [torch.zeros_like(p) for p in init]
    for x, y in used:
        reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        for acc, p in zip(mean_grad, reference.parameters(), strict=True):
            acc += p.grad / len(used)
    for mine, start, grad in zip(model.parameters(), init, mean_grad, strict=True):
        torch.testing.assert_close(mine.detach(), start - lr * grad, atol=1e-6, rtol=0)


# ---- arguments and checkpoints ------------------------------------------------------------------------------


def test_bad_arguments_raise_config_errors():
    model = linear(seed=0)
    with local_swarm(1, **DHT_FAST) as (dht,), shut_down_at_exit() as opts:
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ConfigError, match="target_batch_size = 0"):
            Optimizer(dht=dht, run_id="bad", target_batch_size=0, optimizer=sgd, **FAST)
        with pytest.raises(ConfigError, match="'not_a_hivemind_argument'"):
            Optimizer(dht=dht, run_id="bad", target_batch_size=8, optimizer=sgd, not_a_hivemind_argument=1, **FAST)
        with pytest.raises(ConfigError, match="pass params="):
            Optimizer(dht=dht, run_id="bad", target_batch_size=8, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))

        opt = Optimizer(dht=dht, run_id="bad", target_batch_size=8, optimizer=sgd, **FAST)  # no batch size
        opts.append(opt)
        model(torch.randn(BATCH, IN)).sum().backward()
        with pytest.raises(ConfigError, match="batch_size"):
            opt.step()
        assert opt.samples == 0 and opt.local_epoch == 0


def test_hivemind_arguments_are_accepted():
    model = linear(seed=0)
    with local_swarm(1, **DHT_FAST) as (dht,), shut_down_at_exit() as opts:
        opt = Optimizer(
            dht=dht, run_id="hivemind", target_batch_size=1000,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1), params=model.parameters(),
            delay_optimizer_step=True, reuse_grad_buffers=True, delay_grad_averaging=True, offload_optimizer=False,
            **FAST,
        )  # fmt: skip
        opts.append(opt)
        assert isinstance(opt.opt, torch.optim.SGD)
        assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
        model(torch.randn(BATCH, IN)).sum().backward()
        opt.step(batch_size=BATCH)
        assert opt.samples == BATCH and opt.local_epoch == 0


def test_state_dict_round_trip_keeps_local_epoch():
    model_a, model_b = linear(seed=0), linear(seed=1)
    with local_swarm(1, **DHT_FAST) as (dht,), shut_down_at_exit() as opts:

        def make(run_id: str, model: torch.nn.Module) -> Optimizer:
            sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            opts.append(Optimizer(dht=dht, run_id=run_id, target_batch_size=64, optimizer=sgd, **FAST))
            return opts[-1]

        a, b = make("ckpt-a", model_a), make("ckpt-b", model_b)
        model_a(torch.randn(BATCH, IN)).sum().backward()
        a.opt.step()  # a momentum buffer that is not zero
        a.param_groups[0]["lr"] = 0.025
        a.load_state_dict({**a.state_dict(), "local_epoch": 7})
        assert a.local_epoch == 7 and a.tracker.local_progress.epoch == 7

        buffer = io.BytesIO()
        torch.save(a.state_dict(), buffer)
        buffer.seek(0)
        saved = torch.load(buffer)
        assert saved["local_epoch"] == 7
        b.load_state_dict(saved)
        assert b.local_epoch == 7 and b.tracker.local_progress.epoch == 7
        assert b.state_dict()["local_epoch"] == 7
        assert b.param_groups[0]["lr"] == 0.025
        for mine, theirs in zip(model_b.parameters(), model_a.parameters(), strict=True):
            assert torch.equal(b.state[mine]["momentum_buffer"], a.state[theirs]["momentum_buffer"])
