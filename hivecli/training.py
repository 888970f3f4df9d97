"""The training loop behind `hive start` and `hive join`: a recipe in, a run directory out.

`Trainer` builds the dataset, model and optimizer a recipe names, wraps the optimizer in a
`DecentralizedOptimizer`, and trains until the run reaches its goal (samples over all peers),
this peer reaches one of its limits, or a stop request. Around every step it keeps the run
healthy: a learning-rate schedule over the run's progress, gradient clipping, and a divergence
guard that rolls the peer back to a good state (the run's, from a peer; else its last
checkpoint) instead of training on, or sharing, a broken model.

It reports through a callback (`on_event(name, fields)`): the CLI turns events into a live
display or JSON lines. Its files are described in hivecli.rundir and hivecli.checkpoints; its
DHT reports are made by a `ProgressReporter` thread, never by the training loop.

A peer of several processes (`--nproc-per-node`) runs its Trainer on rank 0 with a
`hivecli.distributed.Leader`: the Trainer then trains through DDP on its shard of the data, and
tells the other ranks at every step whether to stop, the learning rate, and whether its state
changed (see hivecli.distributed).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hivecli._exceptions import ConfigError, HiveError
from hivecli.checkpoints import CheckpointStore
from hivecli.dht.dht import DHT
from hivecli.distributed import Leader, Setup, peer_device, shard_loader
from hivecli.guard import DivergenceGuard
from hivecli.optim import DecentralizedOptimizer, DiLoCoOptimizer, Optimizer
from hivecli.optim.training_averager import all_finite
from hivecli.progress import Curve, ProgressReporter, RunCounter, is_live, merge_records, others_records, plausible_step
from hivecli.recipe import AveragingSection, Recipe
from hivecli.registry import build_model, load_dataset
from hivecli.runcard import RunCard
from hivecli.runs import new_card, publish_run
from hivecli.schedule import Schedule
from hivecli.tblogs import ScalarLog
from hivecli.utils.timing import get_dht_time

logger = logging.getLogger(__name__)
EventCallback = Callable[[str, dict[str, Any]], None]
MAX_ROLLBACK_STREAK = 3  # rollbacks with fewer than HEALTHY_STEPS good steps between them: give up
HEALTHY_STEPS = 200


def build_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = recipe.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def build_model_and_optimizer(recipe: Recipe, input_shape: tuple[int, ...], num_classes: int) -> tuple[Any, Any]:
    torch.manual_seed(recipe.run.seed)  # every peer starts from the same model
    model = build_model(recipe.model, input_shape, num_classes)
    return model, build_optimizer(recipe, model)


def _group_settings(a: AveragingSection) -> dict[str, Any]:
    """The averager settings every averaging mode takes from the recipe as they are."""
    return {
        "target_group_size": a.target_group_size, "min_group_size": a.min_group_size,
        "request_timeout": a.request_timeout, "aggregation": a.aggregation, "trim_fraction": a.trim_fraction,
        "max_weight_ratio": a.max_weight_ratio, "uplink_mbps": a.uplink_mbps, "pacing": a.pacing,
    }  # fmt: skip


def averager_kwargs(recipe: Recipe) -> dict[str, Any]:
    a = recipe.averaging
    return {
        "prefix": recipe.run.prefix,
        **_group_settings(a),
        "average_parameters": a.average_parameters,
        "average_gradients": a.average_gradients,
        "average_opt_statistics": tuple(a.average_opt_statistics),
        "averaging_steps_period": a.every_steps,
        "averaging_time_period": a.every_seconds,
        "compression": a.compression,
        "min_matchmaking_time": a.min_matchmaking_time,
        "allreduce_timeout": a.allreduce_timeout,
        "timeout": a.round_timeout,
    }


def build_run_optimizer(
    recipe: Recipe, base_opt: torch.optim.Optimizer, model: torch.nn.Module, dht: DHT, prefix: str
) -> DecentralizedOptimizer | Optimizer | DiLoCoOptimizer:
    """The recipe's averaging.mode around `base_opt`; the model's buffers travel with the state."""
    a, buffers = recipe.averaging, list(model.buffers())
    if a.mode == "parameters":
        kwargs = {**averager_kwargs(recipe), "prefix": prefix}
        return DecentralizedOptimizer(base_opt, dht, extra_tensors=buffers, **kwargs)
    opts = _group_settings(a)
    common = {
        "dht": dht, "run_id": prefix, "matchmaking_time": a.min_matchmaking_time,
        "averaging_timeout": a.allreduce_timeout, "extra_tensors": buffers, "averager_opts": opts,
    }  # fmt: skip
    if a.mode == "collaborative":
        return Optimizer(
            optimizer=base_opt, target_batch_size=a.target_batch_size or 4 * recipe.data.batch_size,
            batch_size_per_step=recipe.data.batch_size, use_local_updates=a.use_local_updates,
            average_state_every=a.average_state_every, average_opt_statistics=tuple(a.average_opt_statistics),
            grad_compression=a.compression, state_averaging_compression=a.compression, **common,
        )  # fmt: skip
    momentum = a.outer_momentum
    return DiLoCoOptimizer(
        params=model.parameters(), inner_optimizer=base_opt, local_steps=a.local_steps,
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=a.outer_lr, momentum=momentum, nesterov=momentum > 0),
        batch_size_per_step=recipe.data.batch_size, compression=a.compression, **common,
    )  # fmt: skip


def goal_samples(recipe: Recipe, train_size: int) -> int | None:
    """The run's goal in samples over all peers, or None for a run that goes on until stopped."""
    if recipe.run.total_samples is not None:
        return recipe.run.total_samples
    if recipe.run.total_epochs is not None:
        return math.ceil(recipe.run.total_epochs * train_size)
    return None


class Trainer:
    """Trains one peer of a run. Create it after the DHT is up; call `run()`; then `close()`.

    Args:
        recipe: the run's recipe.
        dht: this peer's running DHT.
        run_dir: this peer's directory (hivecli.rundir), already claimed.
        on_event: receives every event (name, fields); called from the training thread.
        run_id: the run's id, announced with the run.
        joining: the run exists already: load its state from a peer before training.
        fresh: do not resume from a checkpoint in `run_dir`.
        card: the run's card (hivecli.runcard), republished as its owner signed it; None for a
            run of this peer's own, whose card it signs when it first announces the run.
        ranks: this peer's other processes (--nproc-per-node), led from here; None: one process.

    Raises (from the constructor):
        ConfigError: the recipe's model, dataset, optimizer or device settings do not fit together.
    """

    def __init__(
        self,
        recipe: Recipe,
        dht: DHT,
        run_dir: Path,
        on_event: EventCallback,
        *,
        run_id: str,
        joining: bool = False,
        fresh: bool = False,
        card: RunCard | None = None,
        ranks: Leader | None = None,
    ):
        self.recipe, self.dht, self.run_dir, self.on_event = recipe, dht, run_dir, on_event
        self.run_id, self.joining, self.fresh = run_id, joining, fresh
        self._card = card
        self.me = str(dht.peer_id)
        self.ranks, self.processes = ranks, 1 if ranks is None else ranks.world
        self.device = peer_device(recipe, self.processes, 0 if ranks is None else ranks.local_rank)
        data = load_dataset(recipe.data)
        self.data = data
        self.model, base_opt = build_model_and_optimizer(recipe, data.input_shape, data.num_classes)
        self.model.to(self.device)
        self.train_model: torch.nn.Module = self.model  # with other ranks, DDP around it once they start
        # each peer its own order of the data: same model seed, different batches
        self._shuffle_seed = int.from_bytes(hashlib.sha256(dht.peer_id.to_bytes()).digest()[:8])
        if ranks is not None:  # this rank's shard, drawn from the peer's order
            self.loader = shard_loader(data.train, recipe.data, self._shuffle_seed, 0, ranks.world)
        else:
            self.loader = DataLoader(
                data.train,
                batch_size=recipe.data.batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=recipe.data.workers,
                generator=torch.Generator().manual_seed(self._shuffle_seed),
            )
        self.test_loader = (
            DataLoader(data.test, batch_size=512, num_workers=recipe.data.workers) if data.test is not None else None
        )
        if len(self.loader) == 0:
            shard = "" if ranks is None else f" shared by {ranks.world} processes (--nproc-per-node)"
            raise ConfigError(
                f"data.batch_size = {recipe.data.batch_size} is larger than the {len(data.train)} training samples "
                f"of dataset {recipe.data.name!r}{shard}; lower data.batch_size"
            )
        # output.tensorboard without the tensorboard package: a ConfigError here, before the optimizer starts
        self._tensorboard = ScalarLog(run_dir / "tensorboard") if recipe.output.tensorboard else None
        # no peer shares its state before prepare() settles it (a checkpoint, the run's): before,
        # it would hand out the seed model
        # with a card, averaging and state sharing are keyed by the run's address, PREFIX@OWNER: the
        # peers of another owner's run with the same prefix are neither averaged with nor downloaded from
        self.opt = build_run_optimizer(recipe, base_opt, self.model, dht, card.address if card else recipe.run.prefix)
        self.opt.averager.allow_state_sharing = False
        o = recipe.optimizer
        self.schedule = Schedule(o.schedule, o.warmup_steps, o.final_lr_fraction)
        self.base_lrs = [group["lr"] for group in base_opt.param_groups]
        self._default_threads = torch.get_num_threads()
        self._group_settings = [
            {k: v for k, v in g.items() if k not in ("params", "lr")} for g in base_opt.param_groups
        ]
        self.goal = goal_samples(recipe, len(data.train))
        self.counter = RunCounter()
        self.curve = Curve()  # this peer's whole-run curve, published with its progress
        self.guard = DivergenceGuard()
        self.checkpoints = CheckpointStore(run_dir / "checkpoints", recipe.output.keep_checkpoints)
        (run_dir / "recipe.toml").write_text(recipe.to_toml())
        self._metrics = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115  (closed in close())
        self.reporter = ProgressReporter(
            dht,
            recipe.run.prefix,
            run_id,
            recipe.output.report_every_seconds,
            progress=self.progress,
            counter=self.counter,
            announce=self.publish,
        )
        self.last_accuracy: float | None = None
        self.best_accuracy: float | None = self.checkpoints.best_metric
        self.loss_ema: float | None = None
        self.samples_per_s = 0.0
        self.rollbacks = 0
        self.state_loads = 0  # checkpoints and run states loaded: with other ranks, they take the state then
        self._rollback_streak, self._healthy_steps = 0, 0
        self._checkpointed = -1  # the step of the last checkpoint written

    @property
    def step(self) -> int:
        return self.opt.local_step

    @property
    def run_samples(self) -> int:
        return self.counter.total

    def publish(self) -> None:
        """Announce the run, its recipe and the model's shapes in the DHT (the reporter repeats it).

        Raises:
            HiveError: the DHT could not store them.
        """
        if self._card is None:  # a run of our own: we sign its card
            self._card = new_card(self.dht, self.recipe.to_dict(), self.run_id)
        publish_run(self.dht, self._card, self.data.input_shape, self.data.num_classes)

    # ---- getting the state to start from --------------------------------------------------------------

    def prepare(self, stop: threading.Event) -> None:
        """Settle the state to start from: this peer's latest checkpoint (unless fresh), then the
        run's state from a peer if the run has moved on since; then start reporting (and with it
        announcing the run). Emits `started` and, when a state is loaded, `state_loaded`.

        Raises:
            HiveError: a peer joining without a checkpoint of its own found no state to start from.
        """
        resumed = None if self.fresh else self.checkpoints.latest()
        if resumed is not None:
            self._load_checkpoint(resumed[1])
        self.opt.averager.state_sharing_priority = self.step
        self.on_event(
            "started",
            {"run_dir": str(self.run_dir), "prefix": self.recipe.run.prefix, "run_id": self.run_id,
             "resumed_from": str(resumed[0]) if resumed else None, "step": self.step},
        )  # fmt: skip
        if self.joining or resumed is not None:
            self._catch_up(stop, resumed is not None)
        self.opt.averager.allow_state_sharing = True
        self.reporter.start()
        if self._checkpointed != self.step and self._finite():
            self.save_checkpoint()  # a state to roll back to from the start

    def _catch_up(self, stop: threading.Event, resumed: bool) -> None:
        """Load the run's state from a peer if this peer has none (a joiner) or the run has
        trained on more samples than this peer's checkpoint knew of."""
        prefix, known = self.recipe.run.prefix, self.run_samples
        try:
            others = others_records(self.dht, prefix, self.run_id)
        except HiveError:
            others = {}
        merge_records(self.counter, others)
        if self.goal is not None and self.run_samples >= self.goal:
            logger.info("Run %r has already reached its goal of %d samples", prefix, self.goal)
            return  # nothing to train, and nobody may be left to send the state
        if others and all(r.get("left") for r in others.values()):  # nobody to load from, nobody to harm
            start = "this peer's checkpoint" if resumed else "the recipe's seed"
            logger.warning("Every peer of run %r has left; going on from %s", prefix, start)
            return
        if resumed and self.run_samples <= known:
            return  # the run has not moved on since this peer's checkpoint
        if not self.load_state_from_peers(stop, timeout=30.0 if not resumed else 10.0) and not stop.is_set():
            if not resumed:  # training from the seed would drag the run's peers back when averaging
                raise HiveError(
                    f"no peer of run {prefix!r} shared its state within 30 s; check that the run is training "
                    f"(`hive peers ADDRESS --run {prefix}`) and join again"
                )
            logger.warning("No peer of run %r shared its newer state; going on from this peer's checkpoint", prefix)

    def plausible_step(self) -> int | None:
        """The highest step a donor's state may claim (see hivecli.progress.plausible_step)."""
        try:
            records = others_records(self.dht, self.recipe.run.prefix, self.run_id).values()
        except HiveError:
            records = []
        now, period = get_dht_time(), self.recipe.output.report_every_seconds
        steps = [r["step"] for r in records if is_live(r, now, period) and type(r.get("step")) is int]
        return plausible_step(self.run_id, steps, time.time())

    def load_state_from_peers(self, stop: threading.Event, timeout: float) -> bool:
        """Take the run's current parameters, optimizer state, step and sample counts from a
        peer. False if no peer shared its state within `timeout`, or `stop` was set."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stop.is_set():
            try:
                loaded = self.opt.load_state_from_peers(
                    timeout=max(1.0, deadline - time.monotonic()), max_step=self.plausible_step()
                )
            except HiveError as e:
                logger.warning("Could not load the run's state: %s; retrying", e)
                loaded = False
            if loaded:
                self.state_loads += 1
                run = self.opt.training_state.loaded_run
                if isinstance(run, dict):
                    self.counter.merge(run.get("samples"))
                self.on_event("state_loaded", {"step": self.step})
                self.reporter.report_now()
                return True
            stop.wait(1.0)
        return False

    def wait_for_peers(self, stop: threading.Event) -> None:
        """Wait, up to run.min_peers_timeout, until the run has run.min_peers live peers."""
        wanted, timeout = self.recipe.run.min_peers, self.recipe.run.min_peers_timeout
        if wanted <= 1:
            return
        began = time.monotonic()
        first_report = began + 2 * self.recipe.output.report_every_seconds
        while self.reporter.reports == 0 and time.monotonic() < first_report and not stop.is_set():
            stop.wait(0.05)  # the peers are counted by the first report: until then, we know nothing
        while not stop.is_set() and self.reporter.peers < wanted:
            elapsed = time.monotonic() - began
            if elapsed >= timeout:
                logger.warning(
                    "Only %d of run.min_peers = %d peers after %.0f s; training with fewer",
                    self.reporter.peers, wanted, timeout,
                )  # fmt: skip
                break
            missing = wanted - self.reporter.peers
            self.on_event(
                "waiting",
                {"what": f"{missing} more peer{'s' if missing > 1 else ''} of run {self.recipe.run.prefix} to join",
                 "elapsed_s": round(elapsed, 1), "remaining_s": round(timeout - elapsed, 1)},
            )  # fmt: skip
            stop.wait(1.0)
        self.on_event("waiting", {"what": "peers", "done": True})

    # ---- the loop -----------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> str:
        """Train until the run's goal, a limit of this peer, or `stop`; returns why it stopped."""
        self.prepare(stop)
        self.wait_for_peers(stop)
        if self.ranks is not None and not stop.is_set():  # the other ranks train from here on, through DDP
            setup = Setup(self.recipe, str(self.run_dir), self._shuffle_seed)
            self.train_model = self.ranks.start(setup, self.model, self.opt.opt, self.device)
        limits, output = self.recipe.limits, self.recipe.output
        started = time.monotonic()
        max_samples = math.ceil(limits.max_epochs * len(self.data.train)) if limits.max_epochs else None
        my_samples = 0
        next_report = started + output.report_every_seconds
        window_samples, window_start = 0, time.monotonic()
        reason = ""
        self.model.train()
        while not reason:
            for x, y in self.loader:
                reason = self._stop_reason(stop, started, my_samples, max_samples)
                factor = self.schedule.factor(*self._schedule_position())
                if self.ranks is not None and self._rank_boundary(bool(reason), factor):
                    reason = reason or "stopped"  # a signal reached another rank
                if reason:
                    break
                before = self.step
                if not self._train_step(x, y, stop, factor):
                    continue
                my_samples += len(y) * self.processes  # every rank trained on a batch as large
                window_samples += len(y) * self.processes
                # in the collaborative and DiLoCo modes the step moves once per epoch (outer step), not
                # per batch: evaluate and save when it reaches a multiple, not at every batch while it is one
                if self.step != before and self.step % output.eval_every_steps == 0:
                    self.evaluate()
                if self.step != before and self.step % output.checkpoint_every_steps == 0:
                    self.save_checkpoint()
                now = time.monotonic()
                if now >= next_report:
                    self.samples_per_s = window_samples / (now - window_start)
                    window_samples, window_start = 0, now
                    next_report = now + output.report_every_seconds
                    self._report()
        averaged_at_end = reason != "stopped" and self._finish_last_round()  # on Ctrl+C: no waiting
        if self.ranks is not None:  # the other ranks leave with the model this one leaves with
            self.ranks.finish(version=self.state_loads, rounds=self.opt.rounds_finished, step=self.step)
        if averaged_at_end or self.step % output.eval_every_steps != 0 or self.last_accuracy is None:
            self.evaluate(final=averaged_at_end)  # the model the peer leaves with
        if window_samples:
            self.samples_per_s = window_samples / max(1e-9, time.monotonic() - window_start)
        self._report()
        path = self.save_checkpoint() if self._checkpointed != self.step else self._checkpoint_path()
        self.on_event(
            "finished",
            {"reason": reason, "step": self.step, "accuracy": self.last_accuracy, "best_accuracy": self.best_accuracy,
             "checkpoint": str(path), "rounds": self.opt.rounds_finished, "rollbacks": self.rollbacks,
             "run_samples": self.run_samples},
        )  # fmt: skip
        return reason

    def _stop_reason(self, stop: threading.Event, started: float, my_samples: int, max_samples: int | None) -> str:
        limits = self.recipe.limits
        if stop.is_set():
            return "stopped"
        if self.goal is not None and self.run_samples >= self.goal:
            return "run_complete"
        if limits.max_steps is not None and self.step >= limits.max_steps:
            return "max_steps"
        if max_samples is not None and my_samples >= max_samples:
            return "max_epochs"
        if limits.max_seconds is not None and time.monotonic() - started >= limits.max_seconds:
            return "max_seconds"
        return ""

    def _finish_last_round(self) -> bool:
        """Average once more with the peers that finish at about the same time, so that they
        leave with the same averaged model; alone, this costs one matchmaking wait. True if
        the parameters changed."""
        a = self.recipe.averaging
        if not isinstance(self.opt, DecentralizedOptimizer):
            return False  # the other modes step together already: their last epoch's step is the run's
        if self.reporter.peers <= 1 and not self.opt.rounds_finished:
            return False  # alone all along: nobody to wait for
        try:
            if self.opt.average_now(timeout=2 * a.min_matchmaking_time + a.request_timeout):
                return True
            logger.info("No peer to average with at the end; keeping local parameters")
        except TimeoutError:
            logger.info("The last averaging round did not finish in time; keeping local parameters")
        return False

    def _rank_boundary(self, stop: bool, factor: float) -> bool:
        """Before every step, with the other ranks: True if the peer stops here (hivecli.distributed)."""
        assert self.ranks is not None
        return self.ranks.boundary(
            stop, factor, version=self.state_loads, rounds=self.opt.rounds_finished, step=self.step
        )

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, stop: threading.Event, factor: float) -> bool:
        """One step at `factor` times the base learning rates; False if the guard found the model
        broken and rolled it back instead."""
        for group, base in zip(self.opt.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        self.opt.zero_grad()
        x, y = x.to(self.device), y.to(self.device)
        loss = F.cross_entropy(self.train_model(x), y)
        problem = self.guard.check(loss.item())
        if problem is not None:
            if self.ranks is not None:  # the other ranks wait for this step's gradients (the rollback's state
                loss.backward()  # then replaces what they made of them)
            self.rollback(problem, stop)
            return False
        loss.backward()
        if self.recipe.optimizer.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.optimizer.clip_grad_norm)
        self.opt.step()
        self.counter.add(self.me, len(y) * self.processes)
        self.loss_ema = self.guard.smoothed
        self._healthy_steps += 1
        return True

    def _schedule_position(self) -> tuple[int, float | None]:
        """(step, fraction of the run's goal) at which the learning-rate schedule is read. In the
        collaborative mode every peer must use the same rate in an epoch, so both come from the
        shared epoch; DiLoCo's inner optimizer warms up over inner steps, not outer ones."""
        fraction = None if self.goal is None else self.run_samples / self.goal
        if isinstance(self.opt, Optimizer):
            samples = self.opt.local_epoch * self.opt.target_batch_size
            return self.step, None if self.goal is None else samples / self.goal
        if isinstance(self.opt, DiLoCoOptimizer):
            return self.step * self.opt.local_steps + self.opt.inner_steps, fraction
        return self.step, fraction

    # ---- the divergence guard's rollback ------------------------------------------------------------

    def rollback(self, reason: str, stop: threading.Event) -> None:
        """Go back to a good state: the run's (from a peer) if others train, else this peer's
        newest checkpoint. Not sharing meanwhile: a broken state must not reach anyone.

        Raises:
            HiveError: the model broke again and again (the recipe diverges; the fix is the user's).
        """
        step = self.step
        self._rollback_streak = self._rollback_streak + 1 if self._healthy_steps < HEALTHY_STEPS else 1
        if self._rollback_streak > MAX_ROLLBACK_STREAK:
            raise HiveError(
                f"training diverged {self._rollback_streak} times within {HEALTHY_STEPS} steps of each other "
                f"(last at step {step}: {reason}); lower optimizer.lr (now {self.recipe.optimizer.lr:g}) "
                f"or set optimizer.clip_grad_norm"
            )
        self.rollbacks += 1
        self._healthy_steps = 0
        self.opt.discard_round()
        self.opt.averager.allow_state_sharing = False
        try:
            source = None
            if self.reporter.peers > 1 and self.load_state_from_peers(stop, timeout=10.0):
                source = "the run's state from a peer"
            if source is None:
                latest = self.checkpoints.latest()
                if latest is None:
                    raise HiveError(f"training diverged at step {step} ({reason}); no checkpoint to go back to")
                self._load_checkpoint(latest[1])
                source = f"checkpoint {latest[0]}"
        finally:
            self.opt.averager.allow_state_sharing = True
        self.guard.reset()
        self.opt.zero_grad()
        self.on_event("rolled_back", {"step": step, "to_step": self.step, "reason": reason, "source": source})
        self._write_metrics({"event": "rolled_back", "reason": reason, "from_step": step, "to_step": self.step,
                             "source": source})  # fmt: skip

    # ---- evaluation and reports -----------------------------------------------------------------------

    def evaluate(self, final: bool = False) -> float | None:
        if self.test_loader is None:
            return None
        self.model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in self.test_loader:
                correct += (self.model(x.to(self.device)).argmax(1).cpu() == y).sum().item()
                total += len(y)
        self.model.train()
        self.last_accuracy = correct / max(1, total)
        best = self.checkpoints.beats_best(self.last_accuracy)
        state = self._state() if best else None  # only then is the state worth building and writing
        best = state is not None and all_finite(state["model"].values())
        if best:
            try:
                self.checkpoints.offer_best(state, self.last_accuracy)
            except OSError as e:
                logger.warning("Could not write the best checkpoint: %s; training goes on", e)
                best = False
        if best:
            self.best_accuracy = self.last_accuracy
        fields = {"step": self.step, "accuracy": round(self.last_accuracy, 4), "best": best}
        self.on_event("eval", {**fields, "final": True} if final else fields)
        self._write_metrics({"event": "eval", "accuracy": self.last_accuracy, "best": best})
        self.reporter.report_now()
        return self.last_accuracy

    def _share_cores(self) -> None:
        """Use this peer's share of the machine's cores, as the reporter last counted them."""
        share = self.reporter.fair_share
        if share is None:
            return
        peers, cores = share
        wanted = min(cores, self._default_threads)  # never more than torch would use alone
        if wanted != torch.get_num_threads():
            logger.info(
                "%d hive peers train on this machine: torch uses %d thread%s here (set OMP_NUM_THREADS to choose)",
                peers, wanted, "" if wanted == 1 else "s",
            )  # fmt: skip
            torch.set_num_threads(wanted)

    def _report(self) -> None:
        """The status for the display and metrics.jsonl (the DHT report is the reporter's)."""
        self._share_cores()
        rate = max(self.reporter.run_samples_per_s, self.samples_per_s)
        eta = (self.goal - self.run_samples) / rate if self.goal is not None and rate > 0 else None
        fields = {
            "step": self.step,
            "loss": None if self.loss_ema is None else round(self.loss_ema, 4),
            "samples_per_s": round(self.samples_per_s, 1),
            "peers": self._live_peers(),
            "rounds": self.opt.rounds_finished,
            "last_group_size": self.opt.last_group_size,
            "accuracy": self.last_accuracy,
            "run_samples": self.run_samples,
            "goal_samples": self.goal,
            "eta_s": None if eta is None else round(max(0.0, eta), 1),
        }
        self.on_event("progress", fields)
        self._write_metrics({"event": "progress", **fields})
        if self._tensorboard is not None:
            self._tensorboard.add(self.step, fields)

    def _live_peers(self) -> int:
        """The run's live peers as the last report saw them; a round that finished since with more
        peers proves they are there (reports come every few seconds, rounds every step)."""
        recent_round = time.monotonic() - self.opt.last_round_finished < 2 * self.recipe.output.report_every_seconds
        return max(self.reporter.peers, self.opt.last_group_size if recent_round else 1)

    def progress(self) -> dict[str, Any]:
        """This peer's progress record in the DHT (called on the reporter's thread)."""
        self.opt.training_state.run_metadata = {"samples": self.counter.counts()}  # what a newcomer gets with the state
        now, loss = get_dht_time(), None if self.loss_ema is None else round(self.loss_ema, 4)
        speed = round(self.samples_per_s, 1)
        self.curve.add(now, self.step, loss, self.last_accuracy, speed)
        return {
            **self._epoch_progress(),
            **self._averaging_progress(),
            "step": self.step,
            "loss": loss,
            "samples_per_s": speed,
            "accuracy": self.last_accuracy,
            "maddrs": [str(m) for m in self.dht.get_visible_maddrs()],
            "time": now,
            "run_id": self.run_id,
            "samples": self.counter.of(self.me),
            "run_samples": self.run_samples,
            "goal_samples": self.goal,
            "curve": self.curve.points(),  # the whole run, coarsely: `hive monitor` draws it from the start
        }

    def _averaging_progress(self) -> dict[str, Any]:
        """What `hive monitor` shows of this peer's averaging and network: rounds, traffic, the latest
        rounds (unix time, group size, seconds, ok) and how others reach it."""
        averager = self.opt.averager
        # "public", "unreachable" or "unknown" from the dial-back, unless a relay carries us
        dialed = "relayed" if self.dht.relayed else self.dht.reachability.status
        reach = "client" if self.dht.client_mode else dialed
        return {
            "rounds": self.opt.rounds_finished,
            "group_size": self.opt.last_group_size,
            "bytes_sent": averager.bytes_sent,
            "bytes_received": averager.bytes_received,
            "pace_mbps": averager.uplink_pace_mbps,  # what rounds pace this peer's uplink to (None: unpaced)
            "recent_rounds": [[round(t, 2), size, round(s, 3), ok] for t, size, s, ok in list(averager.recent_rounds)],
            "reach": reach,
        }

    def _epoch_progress(self) -> dict[str, Any]:
        """collaborative and diloco: the run's global epoch (outer step), the samples (inner
        steps) reported toward the next one, its target and ETA, for `hive peers --run`."""
        tracker = getattr(self.opt, "tracker", None)
        if tracker is None:
            return {}
        g = tracker.global_progress
        return {
            "mode": self.recipe.averaging.mode, "epoch": self.opt.local_step, "global_epoch": g.epoch,
            "epoch_progress": g.samples_accumulated, "epoch_target": g.target_batch_size,
            "epoch_eta": round(max(0.0, g.eta_next_epoch - get_dht_time()), 1),
        }  # fmt: skip

    def _write_metrics(self, fields: dict[str, Any]) -> None:
        self._metrics.write(json.dumps({"time": round(time.time(), 3), "step": self.step, **fields}) + "\n")
        self._metrics.flush()

    # ---- checkpoints --------------------------------------------------------------------------------

    def _finite(self) -> bool:
        return all_finite(self.model.parameters())

    def _state(self) -> dict[str, Any]:
        """A copy of this peer's state, taken at once under the parameters' lock. A copy, not the
        live tensors `state_dict()` returns: the averaging thread and the training step write
        those, and a file written later from them could hold a state that was never checked."""
        with self.opt.lock_parameters:
            return {
                "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": copy.deepcopy(self.opt.state_dict()),
                "step": self.step,
                "recipe": self.recipe.to_dict(),
                "run_id": self.run_id,
                "samples": self.counter.counts(),
            }

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-N.pt and latest.pt; plain `torch.load(path)["model"]` reads them.
        A broken (non-finite) model is never saved: the last good checkpoint stays the newest."""
        state = self._state()
        if not all_finite(state["model"].values()):  # the very tensors that go into the file
            logger.warning("Not saving a checkpoint at step %d: the parameters are not finite", state["step"])
            return self._checkpoint_path()
        try:
            path = self.checkpoints.save(state)
        except OSError as e:  # a full disk must not end a run that others rely on; the last good file stays
            logger.warning("Could not write the checkpoint of step %d: %s; training goes on", self.step, e)
            return self._checkpoint_path()
        self._checkpointed = state["step"]
        self.on_event("checkpoint", {"step": state["step"], "path": str(path)})
        return path

    def _load_checkpoint(self, state: dict[str, Any]) -> None:
        with self.opt.lock_parameters:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            for group, settings in zip(self.opt.param_groups, self._group_settings, strict=True):
                group.update(settings)  # the recipe's momentum, weight decay, betas: not the checkpoint's
            self.opt.training_state.step = state["step"]
        self.counter.merge(state.get("samples"))
        self._checkpointed = state["step"]
        self.state_loads += 1

    def _checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / f"step-{self.step}.pt"

    def close(self) -> None:
        self.reporter.stop()
        self.opt.shutdown()
        self._metrics.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
