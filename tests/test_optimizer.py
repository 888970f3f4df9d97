"""DecentralizedOptimizer through its public API: real DHT peers on loopback, in one process.

Rounds run in the background; tests make them deterministic by starting them with `step()`
on every peer and then waiting with `wait_for_averaging(timeout)`, never by sleeping.
"""

import contextlib
import logging
import threading

import pytest
import torch

from hivecli import ConfigError
from hivecli.optim import DecentralizedOptimizer
from hivecli.testing import local_swarm, torch_devices, wait_for

DHT_FAST = {"wait_timeout": 1.0}
# where the parameters of the tests parametrized by `device` live: a GPU too, on a machine that has one
DEVICES = torch_devices()
FAST = {"min_matchmaking_time": 2.0, "request_timeout": 1.0}
ROUND_TIMEOUT = 30.0


@contextlib.contextmanager
def optimizers(dhts, params, make_opt, **kwargs):
    """One DecentralizedOptimizer per (DHT, parameter), shut down on exit whatever happens."""
    opts = []
    try:
        for dht, param in zip(dhts, params, strict=True):
            kwargs.setdefault("prefix", "test-run")
            kwargs.setdefault("target_group_size", len(dhts))
            opts.append(DecentralizedOptimizer(make_opt([param]), dht, timeout=ROUND_TIMEOUT, **FAST, **kwargs))
        yield opts
    finally:
        for opt in opts:
            opt.shutdown()


def sgd(lr=0.1, **kw):
    return lambda params: torch.optim.SGD(params, lr=lr, **kw)


def set_grad(param, value):
    param.grad = torch.full_like(param, value)


@pytest.mark.parametrize("device", DEVICES)
def test_two_sgd_peers_average_to_the_exact_value_every_round(device):
    a = torch.nn.Parameter(torch.zeros(32, 32, device=device))
    b = torch.nn.Parameter(torch.ones(32, 32, device=device))
    expected_a, expected_b, lr = 0.0, 1.0, 0.1
    with local_swarm(2, **DHT_FAST) as dhts, optimizers(dhts, [a, b], sgd(lr)) as (opt_a, opt_b):
        for round_number in range(1, 4):
            set_grad(a, 1.0), set_grad(b, 2.0)
            opt_a.step()
            opt_b.step()
            assert opt_a.wait_for_averaging(ROUND_TIMEOUT) and opt_b.wait_for_averaging(ROUND_TIMEOUT)
            expected_a = expected_b = ((expected_a - lr * 1.0) + (expected_b - lr * 2.0)) / 2
            torch.testing.assert_close(a.detach(), torch.full((32, 32), expected_a, device=device), atol=1e-6, rtol=0)
            torch.testing.assert_close(b.detach(), torch.full((32, 32), expected_b, device=device), atol=1e-6, rtol=0)
            assert opt_a.rounds_finished == opt_b.rounds_finished == round_number
            assert opt_a.last_group_size == 2
        assert opt_a.local_step == opt_b.local_step == 3


def test_delta_rule_keeps_local_steps_taken_while_a_round_runs():
    a, b = torch.nn.Parameter(torch.zeros(8)), torch.nn.Parameter(torch.full((8,), 3.0))
    lr = 0.5
    with (
        local_swarm(2, **DHT_FAST) as dhts,
        optimizers(dhts, [a, b], sgd(lr), averaging_steps_period=3) as (opt_a, opt_b),
    ):
        for _ in range(3):  # the third step of each starts a round
            set_grad(a, 1.0), set_grad(b, -1.0)
            opt_a.step()
            opt_b.step()
        at_snapshot = (a.detach().clone(), b.detach().clone())
        for _ in range(2):  # a keeps training while the round may still be in flight
            set_grad(a, 1.0)
            opt_a.step()
        opt_a.wait_for_averaging(ROUND_TIMEOUT)
        opt_b.wait_for_averaging(ROUND_TIMEOUT)
        assert opt_a.rounds_finished == opt_b.rounds_finished == 1
        mean = (at_snapshot[0] + at_snapshot[1]) / 2
        torch.testing.assert_close(a.detach(), mean - 2 * lr, atol=1e-6, rtol=0)
        torch.testing.assert_close(b.detach(), mean, atol=1e-6, rtol=0)


def test_adam_statistics_are_averaged_and_the_others_stay_local():
    a, b = torch.nn.Parameter(torch.zeros(16)), torch.nn.Parameter(torch.zeros(16))
    beta1, beta2 = 0.9, 0.99

    def adam(params):
        return torch.optim.Adam(params, lr=1e-3, betas=(beta1, beta2))

    with (
        local_swarm(2, **DHT_FAST) as dhts,
        optimizers(dhts, [a, b], adam, average_opt_statistics=("exp_avg_sq",)) as (opt_a, opt_b),
    ):
        set_grad(a, 1.0), set_grad(b, 3.0)
        opt_a.step()
        opt_b.step()
        assert opt_a.wait_for_averaging(ROUND_TIMEOUT) and opt_b.wait_for_averaging(ROUND_TIMEOUT)
        expected_sq = (1 - beta2) * (1.0**2 + 3.0**2) / 2
        for opt, grad in ((opt_a, 1.0), (opt_b, 3.0)):
            state = opt.state[opt.param_groups[0]["params"][0]]
            torch.testing.assert_close(state["exp_avg_sq"], torch.full((16,), expected_sq), atol=1e-7, rtol=0)
            torch.testing.assert_close(state["exp_avg"], torch.full((16,), (1 - beta1) * grad), atol=1e-7, rtol=0)
            assert float(state["step"]) == 1.0  # the state initialisation does not count as a step
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-7, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_late_joiner_loads_parameters_optimizer_state_and_step_from_the_run(device):
    torch.manual_seed(0)
    veteran_model, newcomer_model = torch.nn.Linear(6, 3).to(device), torch.nn.Linear(6, 3).to(device)
    with local_swarm(2, **DHT_FAST) as (dht_a, dht_b):
        veteran = DecentralizedOptimizer(
            torch.optim.SGD(veteran_model.parameters(), lr=0.1, momentum=0.9),
            dht_a,
            prefix="late",
            target_group_size=2,
            averaging_steps_period=1000,  # no rounds: the veteran trains alone
            **FAST,
        )
        newcomer = DecentralizedOptimizer(
            torch.optim.SGD(newcomer_model.parameters(), lr=0.1, momentum=0.9),
            dht_b,
            prefix="late",
            target_group_size=2,
            allow_state_sharing=False,
            **FAST,
        )
        try:
            for _ in range(7):
                veteran.zero_grad()
                veteran_model(torch.randn(4, 6, device=device)).pow(2).sum().backward()
                veteran.step()
            assert newcomer.local_step == 0
            wait_for(lambda: newcomer.averager.load_state_from_peers(timeout=5), 20, "a donor to share its state")
            assert newcomer.local_step == veteran.local_step == 7
            for mine, theirs in zip(newcomer_model.parameters(), veteran_model.parameters(), strict=True):
                assert torch.equal(mine, theirs)
                assert torch.equal(newcomer.state[mine]["momentum_buffer"], veteran.state[theirs]["momentum_buffer"])
        finally:
            newcomer.shutdown()
            veteran.shutdown()


def test_keeps_training_alone_when_its_peer_leaves(caplog):
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.ones(4))
    lr = 0.1
    with local_swarm(2, **DHT_FAST) as (dht_a, dht_b):
        opt_a = DecentralizedOptimizer(
            torch.optim.SGD([a], lr=lr), dht_a, prefix="leave", target_group_size=2, timeout=3.0, **FAST
        )
        opt_b = DecentralizedOptimizer(
            torch.optim.SGD([b], lr=lr), dht_b, prefix="leave", target_group_size=2, timeout=3.0, **FAST
        )
        try:
            set_grad(a, 0.0), set_grad(b, 0.0)
            opt_a.step()
            opt_b.step()
            assert opt_a.wait_for_averaging(ROUND_TIMEOUT) and opt_b.wait_for_averaging(ROUND_TIMEOUT)
        finally:
            opt_b.shutdown()
        dht_b.shutdown()
        torch.testing.assert_close(a.detach(), torch.full((4,), 0.5))
        try:
            with caplog.at_level(logging.INFO, logger="hivecli.optim"):
                set_grad(a, 1.0)
                opt_a.step()  # starts a round that finds nobody within its timeout
                assert opt_a.wait_for_averaging(ROUND_TIMEOUT) is False
            assert opt_a.rounds_failed == 1 and "Averaging round found no group" in caplog.text
            for _ in range(3):
                set_grad(a, 1.0)
                opt_a.step()
            torch.testing.assert_close(a.detach(), torch.full((4,), 0.5 - 4 * lr), atol=1e-6, rtol=0)
            assert opt_a.local_step == 5
        finally:
            opt_a.shutdown()


def test_works_as_a_torch_optimizer_for_schedulers_and_checkpoints():
    model = torch.nn.Linear(3, 2)
    with local_swarm(1, **DHT_FAST) as (dht,):
        opt = DecentralizedOptimizer(
            torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5),
            dht,
            prefix="sched",
            target_group_size=2,
            averaging_steps_period=1000,
            **FAST,
        )
        try:
            scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            model(torch.ones(1, 3)).sum().backward()
            opt.step()
            scheduler.step()
            assert opt.opt.param_groups[0]["lr"] == 0.5 and opt.param_groups is opt.opt.param_groups
            saved = opt.state_dict()
            fresh = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
            fresh.load_state_dict(saved)  # plain torch reads our checkpoints
            assert fresh.param_groups[0]["lr"] == 0.5
            opt.zero_grad()
            assert all(p.grad is None for p in model.parameters())
            with pytest.raises(ConfigError, match="add them to the wrapped optimizer"):
                opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
        finally:
            opt.shutdown()


def test_bad_arguments_name_the_value_and_the_fix():
    param = torch.nn.Parameter(torch.zeros(2))
    with local_swarm(1, **DHT_FAST) as (dht,):
        with pytest.raises(ConfigError, match=r"'exp_avg_sqq'.*it has: exp_avg, exp_avg_sq, step"):
            DecentralizedOptimizer(
                torch.optim.Adam([param]),
                dht,
                prefix="bad",
                target_group_size=2,
                average_opt_statistics=("exp_avg_sqq",),
            )
        with pytest.raises(ConfigError, match="averaging_steps_period = 0"):
            DecentralizedOptimizer(
                torch.optim.SGD([param], lr=0.1), dht, prefix="bad", target_group_size=2, averaging_steps_period=0
            )
        with pytest.raises(ConfigError, match="nothing to average"):
            DecentralizedOptimizer(
                torch.optim.SGD([param], lr=0.1), dht, prefix="bad", target_group_size=2, average_parameters=False
            )
        with pytest.raises(ConfigError, match=r"pass a torch\.optim\.Optimizer"):
            DecentralizedOptimizer([param], dht, prefix="bad", target_group_size=2)


def test_verbose_logs_rounds_like_the_quickstart(caplog):
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.ones(3))
    with (
        caplog.at_level(logging.INFO, logger="hivecli.optim"),
        local_swarm(2, **DHT_FAST) as dhts,
        optimizers(dhts, [a, b], sgd(), verbose=True) as (opt_a, opt_b),
    ):
        set_grad(a, 0.0), set_grad(b, 0.0)
        opt_a.step()
        opt_b.step()
        assert opt_a.wait_for_averaging(ROUND_TIMEOUT) and opt_b.wait_for_averaging(ROUND_TIMEOUT)
    assert caplog.text.count("Starting a new averaging round with current parameters.") == 2
    assert caplog.text.count("with 2 peers.") == 2
    assert "Finished averaging round in" in caplog.text


def test_average_now_leaves_peers_that_finish_together_with_the_same_model():
    a, b = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.ones(5))
    with (
        local_swarm(2, **DHT_FAST) as dhts,
        optimizers(dhts, [a, b], sgd(), averaging_steps_period=1000) as (opt_a, opt_b),
    ):
        set_grad(a, 1.0), set_grad(b, -1.0)
        opt_a.step()
        opt_b.step()  # no round yet: the period is 1000 steps
        results = {}
        threads = [
            threading.Thread(target=lambda k=k, o=o: results.__setitem__(k, o.average_now(timeout=ROUND_TIMEOUT)))
            for k, o in (("a", opt_a), ("b", opt_b))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=ROUND_TIMEOUT + 30)
        assert results == {"a": True, "b": True}
        expected = ((0.0 - 0.1) + (1.0 + 0.1)) / 2
        torch.testing.assert_close(a.detach(), torch.full((5,), expected), atol=1e-6, rtol=0)
        torch.testing.assert_close(b.detach(), a.detach(), atol=1e-6, rtol=0)


def test_wrapping_a_resumed_optimizer_keeps_its_state():
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([used, unused], lr=0.1)
    for _ in range(5):  # `unused` never gets a gradient, so it has no state yet
        used.grad = torch.ones(3)
        adam.step()
    before = {k: v.clone() for k, v in adam.state[used].items()}
    with local_swarm(1, **DHT_FAST) as (dht,):
        opt = DecentralizedOptimizer(adam, dht, prefix="resumed", target_group_size=2, **FAST)
        try:
            for key, value in before.items():
                assert torch.equal(opt.state[used][key], value), key
            assert float(opt.state[unused]["step"]) == 0.0 and not opt.state[unused]["exp_avg"].any()
            torch.testing.assert_close(unused.detach(), torch.ones(3))
        finally:
            opt.shutdown()


def test_load_state_dict_keeps_groups_and_averaged_statistics_attached():
    param = torch.nn.Parameter(torch.zeros(4))
    with local_swarm(1, **DHT_FAST) as (dht,):
        opt = DecentralizedOptimizer(
            torch.optim.Adam([param], lr=1.0), dht, prefix="reload", target_group_size=2,
            average_opt_statistics=("exp_avg_sq",), averaging_steps_period=1000, **FAST,
        )  # fmt: skip
        try:
            other = torch.optim.Adam([torch.nn.Parameter(torch.zeros(4))], lr=0.25)
            other.param_groups[0]["params"][0].grad = torch.ones(4)
            other.step()
            opt.load_state_dict(other.state_dict())
            assert opt.param_groups is opt.opt.param_groups and opt.param_groups[0]["lr"] == 0.25
            sources = [t for kind, t in opt.averager._sources if kind == "stat"]
            assert sources == [opt.opt.state[param]["exp_avg_sq"]] and sources[0] is opt.opt.state[param]["exp_avg_sq"]
        finally:
            opt.shutdown()


def test_model_buffers_travel_with_the_state():
    torch.manual_seed(0)
    veteran_model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    newcomer_model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with local_swarm(2, **DHT_FAST) as (dht_a, dht_b):
        veteran = DecentralizedOptimizer(
            torch.optim.SGD(veteran_model.parameters(), lr=0.1), dht_a, prefix="bn", target_group_size=2,
            averaging_steps_period=1000, extra_tensors=list(veteran_model.buffers()), **FAST,
        )  # fmt: skip
        newcomer = DecentralizedOptimizer(
            torch.optim.SGD(newcomer_model.parameters(), lr=0.1), dht_b, prefix="bn", target_group_size=2,
            allow_state_sharing=False, extra_tensors=list(newcomer_model.buffers()), **FAST,
        )  # fmt: skip
        try:
            for _ in range(3):
                veteran.zero_grad()
                veteran_model(torch.randn(8, 4) * 5 + 3).sum().backward()
                veteran.step()
            wait_for(lambda: newcomer.averager.load_state_from_peers(timeout=5), 20, "a donor to share its state")
            for mine, theirs in zip(newcomer_model.buffers(), veteran_model.buffers(), strict=True):
                assert torch.equal(mine, theirs)
            assert int(newcomer_model[1].num_batches_tracked) == 3
        finally:
            newcomer.shutdown()
            veteran.shutdown()
