"""`DiLoCoOptimizer` on real loopback DHTs, in one process, against outer steps computed by hand.

Each peer takes its inner steps in its own thread with its own DHT, on its own fixed data; the
expected outer step is computed in the test: every peer's plain SGD steps from the shared
initial parameters, the pseudo-gradients (initial - local) averaged with the peers' weights,
then one Nesterov SGD step (whose momentum buffer starts at zero: new = init - lr (1 + m) g).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from hivecli import ConfigError
from hivecli.optim import DiLoCoOptimizer
from hivecli.testing import local_swarm, torch_devices

DHT_FAST = {"wait_timeout": 1.0}
FAST = {"matchmaking_time": 2.0, "averaging_timeout": 10.0, "load_state_timeout": 20.0}
LONE = {**FAST, "matchmaking_time": 1.0, "averaging_timeout": 2.0}  # a lone peer's round fails quickly
IN, OUT = 4, 1
H, INNER_LR, OUTER_LR, MOMENTUM = 5, 0.1, 0.7, 0.9
JOIN_TIMEOUT = 60.0
# where the models of the tests parametrized by `device` train: a GPU too, on a machine that has one
# (the outer parameters and their momentum stay on the CPU)
DEVICES = torch_devices()


def linear(seed: int, device: str = "cpu") -> torch.nn.Linear:
    """A small model whose parameters depend on `seed` only (not on the global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(IN, OUT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model.to(device)


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def peer_data(peer: int, batch_size: int, steps: int = H) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1000 + peer)
    return [
        (torch.randn(batch_size, IN, generator=gen), torch.randn(batch_size, OUT, generator=gen)) for _ in range(steps)
    ]


def diloco(dht, model, **kwargs) -> DiLoCoOptimizer:
    options = {"run_id": "diloco", "local_steps": H, **FAST, **kwargs}
    return DiLoCoOptimizer(
        dht=dht,
        params=model.parameters(),
        inner_optimizer=lambda p: torch.optim.SGD(p, lr=INNER_LR),
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=OUTER_LR, momentum=MOMENTUM, nesterov=True),
        **options,
    )


def inner_steps(opt: DiLoCoOptimizer, model: torch.nn.Module, data, batch_size: int | None = None) -> None:
    device = next(model.parameters()).device
    for x, y in data:
        opt.zero_grad()
        F.mse_loss(model(x.to(device)), y.to(device)).backward()
        opt.step(batch_size=batch_size)


def pseudo_grad_by_hand(init: torch.nn.Module, data) -> list[torch.Tensor]:
    """initial - local after plain SGD steps on `data`."""
    model = linear(seed=0)
    model.load_state_dict(init.state_dict())
    for x, y in data:
        model.zero_grad()
        F.mse_loss(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= INNER_LR * p.grad
    return [p0.detach() - p.detach() for p0, p in zip(init.parameters(), model.parameters(), strict=True)]


def outer_step_by_hand(init: torch.nn.Module, pseudo_grad: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p0.detach() - OUTER_LR * (1 + MOMENTUM) * g for p0, g in zip(init.parameters(), pseudo_grad, strict=True)]


def run_in_threads(*jobs: tuple[Any, ...]) -> None:
    """Run each (fn, *args) in its own thread; join them all; re-raise the first failure."""
    errors: list[BaseException] = []

    def run(fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=job, name=f"peer-{i}", daemon=True) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise AssertionError(f"a peer failed: {errors[0]!r}") from errors[0]
    assert not any(t.is_alive() for t in threads), f"peers still running after {JOIN_TIMEOUT} s"


@contextlib.contextmanager
def shut_down_at_exit() -> Iterator[list[DiLoCoOptimizer]]:
    opts: list[DiLoCoOptimizer] = []
    try:
        yield opts
    finally:
        for opt in opts:
            opt.shutdown()


def assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """Compares on the CPU, where the expected values are computed (`actual` may be on a GPU)."""
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.detach().cpu(), e, atol=1e-6, rtol=0)


def two_peers_take_an_outer_step(
    dhts, opts, batch_sizes: tuple[int, int], pass_to_step: bool = False, device: str = "cpu"
):
    """Two peers from the same init, H inner steps each on their own data, one averaged outer step.
    Returns (init, models on `device`, the weighted mean pseudo-gradient computed by hand on the CPU)."""
    init = linear(seed=0)
    models = [linear(seed=0, device=device) for _ in range(2)]
    data = [peer_data(i, batch_sizes[i]) for i in range(2)]
    for dht, model, batch_size in zip(dhts, models, batch_sizes, strict=True):
        opts.append(diloco(dht, model, **({} if pass_to_step else {"batch_size_per_step": batch_size})))
    run_in_threads(
        *[
            (inner_steps, opt, model, d, batch_size if pass_to_step else None)
            for opt, model, d, batch_size in zip(opts, models, data, batch_sizes, strict=True)
        ]
    )
    grads = [pseudo_grad_by_hand(init, d) for d in data]
    total = sum(batch_sizes)
    mean = [(batch_sizes[0] * g0 + batch_sizes[1] * g1) / total for g0, g1 in zip(*grads, strict=True)]
    return init, models, mean


@pytest.mark.parametrize("device", DEVICES)
def test_two_peers_take_the_outer_step_computed_by_hand(device):
    with local_swarm(2, **DHT_FAST) as dhts, shut_down_at_exit() as opts:
        init, models, mean_pseudo_grad = two_peers_take_an_outer_step(dhts, opts, (8, 8), device=device)
        expected = outer_step_by_hand(init, mean_pseudo_grad)
        for opt, model in zip(opts, models, strict=True):
            assert opt.local_epoch == 1 and opt.inner_steps == 0
            assert opt.rounds_finished == 1 and opt.rounds_failed == 0 and opt.last_group_size == 2
            assert_close(list(model.parameters()), expected)
            assert_close(opt.outer_params, expected)
            assert_close([opt.outer_opt.state[p]["momentum_buffer"] for p in opt.outer_params], mean_pseudo_grad)
        for mine, theirs in zip(models[0].parameters(), models[1].parameters(), strict=True):
            assert torch.equal(mine, theirs)  # the same averaged pseudo-gradient, the same outer step
            assert mine.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_newcomer_downloads_outer_parameters_and_momentum(device):
    with local_swarm(3, **DHT_FAST) as dhts, shut_down_at_exit() as opts:
        _, models, _ = two_peers_take_an_outer_step(dhts[:2], opts, (8, 8), device=device)
        donor = opts[0]
        newcomer_model = linear(seed=1, device=device)  # another init: only the download can make it equal
        newcomer = diloco(dhts[2], newcomer_model)
        opts.append(newcomer)
        assert newcomer.local_epoch == 0
        assert newcomer.load_state_from_peers(timeout=20) is True
        assert newcomer.local_epoch == donor.local_epoch == 1
        assert newcomer.inner_steps == 0
        for mine, theirs in zip(newcomer.outer_params, donor.outer_params, strict=True):
            assert torch.equal(mine, theirs)
            assert torch.equal(
                newcomer.outer_opt.state[mine]["momentum_buffer"], donor.outer_opt.state[theirs]["momentum_buffer"]
            )
            assert bool(newcomer.outer_opt.state[mine]["momentum_buffer"].abs().sum() > 0)
        for mine, theirs in zip(newcomer_model.parameters(), models[0].parameters(), strict=True):
            assert torch.equal(mine, theirs)


@pytest.mark.parametrize("pass_to_step", [False, True], ids=["batch_size_per_step", "step_batch_size"])
def test_pseudo_gradients_are_weighted_by_samples(pass_to_step):
    with local_swarm(2, **DHT_FAST) as dhts, shut_down_at_exit() as opts:
        init, models, mean_pseudo_grad = two_peers_take_an_outer_step(dhts, opts, (8, 24), pass_to_step)
        equal_mean = [
            (g0 + g1) / 2
            for g0, g1 in zip(*(pseudo_grad_by_hand(init, peer_data(i, b)) for i, b in ((0, 8), (1, 24))), strict=True)
        ]
        assert max(float((a - b).abs().max()) for a, b in zip(mean_pseudo_grad, equal_mean, strict=True)) > 1e-3
        expected = outer_step_by_hand(init, mean_pseudo_grad)  # weighted 8:24 = 1:3
        for opt, model in zip(opts, models, strict=True):
            assert opt.local_epoch == 1 and opt.last_group_size == 2
            assert_close(list(model.parameters()), expected)
            assert_close([opt.outer_opt.state[p]["momentum_buffer"] for p in opt.outer_params], mean_pseudo_grad)


def test_bad_arguments_raise_config_errors():
    model = linear(seed=0)
    with local_swarm(1, **DHT_FAST) as (dht,):
        with pytest.raises(ConfigError, match="outer_optimizer must be a callable"):
            DiLoCoOptimizer(
                dht=dht, run_id="bad", params=model.parameters(),
                inner_optimizer=lambda p: torch.optim.SGD(p, lr=INNER_LR),
                outer_optimizer=torch.optim.SGD(list(model.parameters()), lr=OUTER_LR),
            )  # fmt: skip
        with pytest.raises(ConfigError, match="local_steps = 0"):
            DiLoCoOptimizer(
                dht=dht, run_id="bad", params=model.parameters(), local_steps=0,
                inner_optimizer=lambda p: torch.optim.SGD(p, lr=INNER_LR),
                outer_optimizer=lambda p: torch.optim.SGD(p, lr=OUTER_LR),
            )  # fmt: skip


def test_lone_peer_applies_its_own_pseudo_gradient(caplog):
    local_steps = 3
    init, model = linear(seed=0), linear(seed=0)
    data = peer_data(0, 8, steps=local_steps)
    with local_swarm(1, **DHT_FAST) as (dht,), shut_down_at_exit() as opts:
        opt = diloco(dht, model, run_id="alone", local_steps=local_steps, **LONE)
        opts.append(opt)
        with caplog.at_level(logging.INFO, logger="hivecli.optim"):
            inner_steps(opt, model, data)
        assert opt.local_epoch == 1 and opt.inner_steps == 0
        assert opt.rounds_failed == 1 and opt.rounds_finished == 0
        assert "applying this peer's own" in caplog.text
        own = pseudo_grad_by_hand(init, data)
        assert_close(list(model.parameters()), outer_step_by_hand(init, own))
        assert_close([opt.outer_opt.state[p]["momentum_buffer"] for p in opt.outer_params], own)
